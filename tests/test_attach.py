"""Attaching MoPs to tiny LLaMA-family models: masks, identity, generate, detach, frozen backbone."""
import pytest
import torch

import mops_fast
from mops_fast import MoPsConfig
from mops_fast.hf.attach import get_mops
from tests.conftest import tiny_model


def batch(B=3, S=9, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    am[1, :3] = 0  # left padded
    am[B - 1, -2:] = 0  # right padded
    return ids, am


def left_padded_generate(new_tokens):
    """A batch for generate (sample 1 left padded) and greedy generate's keywords, logits returned."""
    ids, am = batch(B=2)
    am[1] = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1])
    am[0] = 1
    kw = dict(attention_mask=am, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    return ids, kw


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_attach_changes_outputs_and_detach_restores_exactly(model_type):
    m = tiny_model(model_type)
    ids, am = batch()
    base = m(input_ids=ids, attention_mask=am).logits
    mops_fast.attach(m, MoPsConfig(num_experts=3, prompt_len=2, gate_layer=1, init="random"))
    out = m(input_ids=ids, attention_mask=am).logits
    assert not torch.allclose(out, base)
    mops_fast.detach(m)
    after = m(input_ids=ids, attention_mask=am).logits
    assert torch.equal(after, base)
    assert not hasattr(m, "mops")


def test_padded_batch_matches_unpadded_rows(tiny_llama):
    """Each row of a padded batch equals that sample run alone (the mask function is registered)."""
    m = tiny_llama
    mops_fast.attach(m, MoPsConfig(num_experts=2, prompt_len=3, gate_layer=1, init="random"))
    ids, am = batch()
    pos_full = (am.cumsum(1) - 1).clamp(min=0)  # left padding shifts positions
    full = m(input_ids=ids, attention_mask=am, position_ids=pos_full).logits
    for b in range(ids.shape[0]):
        keep = am[b].bool()
        pos = torch.arange(int(keep.sum()))[None]
        alone = m(input_ids=ids[b:b + 1, keep], position_ids=pos).logits[0]
        torch.testing.assert_close(full[b, keep], alone, rtol=1e-4, atol=1e-4)


def test_one_key_mask_a_forward(tiny_llama, monkeypatch):
    """Every injected layer of a forward gets the same key-mask tensor (what the attention learns of it,
    right padding, is then read once a forward); the next forward builds its own."""
    from mops_fast.hf import attach as attach_mod

    m = tiny_llama
    mops_fast.attach(m, MoPsConfig(num_experts=2, prompt_len=3, gate_layer=1, init="random"))
    seen = []
    real = attach_mod.gated_prefix_attention
    monkeypatch.setattr(attach_mod, "gated_prefix_attention",
                        lambda *a, **kw: seen.append(a[6]) or real(*a, **kw))
    ids, am = batch()
    for _ in range(2):
        m(input_ids=ids, attention_mask=am)
    per_forward = len(seen) // 2
    assert per_forward >= 2 and all(t is seen[0] for t in seen[:per_forward])
    assert seen[per_forward] is not seen[0] and torch.equal(seen[per_forward], seen[0])
    assert torch.equal(seen[0], am.bool())


def test_identity_equal_experts_in_model(tiny_llama):
    """All experts equal: MoPs output equals the one-prompt model, whatever the gate says."""
    m = tiny_llama
    ids, am = batch()
    mops_fast.attach(m, MoPsConfig(num_experts=4, prompt_len=2, gate_layer=1, init="random", top_k=2))
    mops = get_mops(m)
    with torch.no_grad():
        mops.prompt_k.copy_(mops.prompt_k[:, :1].expand_as(mops.prompt_k))
        mops.prompt_v.copy_(mops.prompt_v[:, :1].expand_as(mops.prompt_v))
        pk, pv = mops.prompt_k[:, 0].clone(), mops.prompt_v[:, 0].clone()
    a = m(input_ids=ids, attention_mask=am).logits
    assert (mops.state.logw == float("-inf")).any()  # top-k really zeroed experts
    mops_fast.detach(m)
    mops_fast.attach(m, MoPsConfig(num_experts=1, prompt_len=2, gate=False, gate_layer=1, init="random"))
    with torch.no_grad():
        get_mops(m).prompt_k.copy_(pk[:, None])
        get_mops(m).prompt_v.copy_(pv[:, None])
    b = m(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,cache", [("scale", "dynamic"), ("mix", "dynamic"), ("scale", "static"),
                                        ("mix", "static")])
def test_generate_with_cache_matches_full_forward(tiny_llama, mode, cache):
    # a static cache hands the attention all of its slots, the unfilled ones included
    m = tiny_llama
    mops_fast.attach(m, MoPsConfig(num_experts=3, prompt_len=2, gate_layer=1, init="random", mode=mode))
    ids, am = batch(B=2)
    am[1] = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1])  # generate wants left padding
    am[0] = 1
    n = 5
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    g = m.generate(input_ids=ids, attention_mask=am, max_new_tokens=n, do_sample=False, output_logits=True,
                   return_dict_in_generate=True, pad_token_id=0, **extra)
    seq = g.sequences
    am2 = torch.cat([am, torch.ones(2, n, dtype=am.dtype)], 1)
    gm = torch.cat([am, torch.zeros(2, n, dtype=am.dtype)], 1)  # the gate reads the prompt only
    pos = (am2.cumsum(1) - 1).clamp(min=0)
    full = m(input_ids=seq, attention_mask=am2, position_ids=pos, gate_mask=gm).logits
    for t in range(n):
        torch.testing.assert_close(g.logits[t], full[:, ids.shape[1] + t - 1], rtol=1e-4, atol=1e-4)


def test_only_prompts_and_gate_get_gradients_and_backbone_unchanged(tiny_llama):
    m = tiny_llama
    before = {k: v.clone() for k, v in m.state_dict().items()}
    mops_fast.attach(m, MoPsConfig(num_experts=2, prompt_len=2, gate_layer=1, init="random"))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    ids, am = batch()
    for _ in range(3):
        loss = m(input_ids=ids, attention_mask=am, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("mops.") for n in trainable)
    assert all(p.grad is None for n, p in m.named_parameters() if not n.startswith("mops."))
    mops_fast.detach(m)
    after = m.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in m.parameters())  # flags restored as they were


def test_gate_mask_changes_gate_and_empty_gate_mask_is_an_error(tiny_llama):
    m = tiny_llama
    mops_fast.attach(m, MoPsConfig(num_experts=3, prompt_len=2, gate_layer=2, init="random"))
    ids, am = batch()
    gm = am.clone()
    gm[:, 5:] = 0
    m(input_ids=ids, attention_mask=am, gate_mask=gm)
    w1 = get_mops(m).state.logw.clone()
    m(input_ids=ids, attention_mask=am)
    assert not torch.allclose(w1, get_mops(m).state.logw)
    gm[1] = 0
    with pytest.raises(ValueError, match="gate mask is empty for sample"):
        m(input_ids=ids, attention_mask=am, gate_mask=gm)


def test_bad_configs_and_models(tiny_llama):
    for kw, msg in [(dict(num_experts=0), "num_experts"), (dict(prompt_len=0), "prompt_len"),
                    (dict(temperature=0.0), "temperature"), (dict(num_experts=2, top_k=3), "top_k"),
                    (dict(mode="avg"), "mode")]:
        with pytest.raises(ValueError, match=msg):
            MoPsConfig(**kw)
    with pytest.raises(ValueError, match="gate_layer=7 is outside"):
        mops_fast.attach(tiny_llama, MoPsConfig(gate_layer=7))
    assert not hasattr(tiny_llama, "mops")
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="supports model types.*'gpt2'"):
        mops_fast.attach(gpt2, MoPsConfig())
    mops_fast.attach(tiny_llama, MoPsConfig(gate_layer=1))
    with pytest.raises(ValueError, match="already has MoPs"):
        mops_fast.attach(tiny_llama, MoPsConfig(gate_layer=1))


def test_kv_init_takes_backbone_keys(tiny_llama):
    m = tiny_llama
    mops_fast.attach(m, MoPsConfig(num_experts=2, prompt_len=3, gate_layer=1, init="kv"))
    ids, am = batch()
    mops_fast.init_prompts_from_kv(m, ids, am, seed=0)
    pk = get_mops(m).prompt_k
    # every prompt key of layer 1 must be a real post-RoPE key of the batch at layer 1
    mops_fast.detach(m)
    out = m(input_ids=ids, attention_mask=am, use_cache=True)
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    keys = cache.layers[1].keys if hasattr(cache, "layers") else cache.key_cache[1]  # (B, Hkv, S, d)
    real = keys.permute(0, 2, 1, 3)[am.bool()]  # (n, Hkv, d)
    for e in range(2):
        for t in range(3):
            dist = (real - pk[0, e, t]).abs().amax((-1, -2))
            assert dist.min().item() < 1e-5


def _uncached_logits(m, ids, am):
    """Logits with the attention's prompt cache cleared before the forward (what the prompts say now)."""
    get_mops(m).state.prompt_cache.clear()
    with torch.no_grad():
        return m(input_ids=ids, attention_mask=am).logits


def test_prompt_cache_follows_prompt_changes(tiny_llama):
    """Forwards without autograd keep each layer's prompts (in the compute dtype) between calls; every way
    of changing the prompts is seen by the next forward: in-place updates, a replaced parameter, new
    storage behind the same parameter, a dtype change; and a forward with autograd never reads the cache."""
    m = tiny_llama
    mops_fast.attach(m, MoPsConfig(num_experts=2, prompt_len=3, gate_layer=1, init="random"))
    mops = get_mops(m)
    ids, am = batch()
    with torch.no_grad():
        first = m(input_ids=ids, attention_mask=am).logits
        assert len(mops.state.prompt_cache) == len(mops.injected_layers)
        assert torch.equal(m(input_ids=ids, attention_mask=am).logits, first)  # served from the cache
        mops.prompt_k.add_(0.5)  # in place (an optimizer step, load_state_dict, init_prompts_from_kv)
        changed = m(input_ids=ids, attention_mask=am).logits
    assert not torch.allclose(changed, first)
    assert torch.equal(changed, _uncached_logits(m, ids, am))

    with torch.no_grad():
        mops.prompt_v.data = mops.prompt_v.detach() * 2  # new storage, same parameter and version
        out = m(input_ids=ids, attention_mask=am).logits
    assert torch.equal(out, _uncached_logits(m, ids, am)) and not torch.allclose(out, changed)

    with torch.no_grad():
        m(input_ids=ids, attention_mask=am)
    mops.prompt_k = torch.nn.Parameter(mops.prompt_k.detach() - 1.0)  # a replaced parameter
    with torch.no_grad():
        out = m(input_ids=ids, attention_mask=am).logits
    assert torch.equal(out, _uncached_logits(m, ids, am))

    with torch.no_grad():
        m(input_ids=ids, attention_mask=am)
    mops.double()  # a cast of the module: same parameter objects and versions, new storage and dtype
    with torch.no_grad():
        out = m(input_ids=ids, attention_mask=am).logits
    assert all(pk.dtype == torch.float32 for _, _, _, pk, *_ in mops.state.prompt_cache.values())
    assert torch.equal(out, _uncached_logits(m, ids, am))
    mops.float()

    # with autograd the prompts come fresh from the parameters (the cache would cut the graph)
    with torch.no_grad():
        m(input_ids=ids, attention_mask=am)
    m(input_ids=ids, attention_mask=am).logits.sum().backward()
    assert mops.prompt_k.grad is not None and mops.prompt_k.grad.abs().sum() > 0


def test_prompt_cache_of_cast_prompts_follows_in_place_updates(tiny_llama):
    """fp32 prompts in a float64 backbone: the cache holds cast copies, which an in-place update of the
    parameters (no new storage) must replace."""
    m = tiny_llama
    mops_fast.attach(m, MoPsConfig(num_experts=2, prompt_len=3, gate_layer=1, init="random"))
    mops = get_mops(m)
    m.model.double()
    m.lm_head.double()
    mops.float()
    ids, am = batch()
    with torch.no_grad():
        first = m(input_ids=ids, attention_mask=am).logits
        assert all(pk.dtype == torch.float64 for _, _, _, pk, *_ in mops.state.prompt_cache.values())
        mops.prompt_v.mul_(3.0)
        out = m(input_ids=ids, attention_mask=am).logits
    assert not torch.allclose(out, first)
    assert torch.equal(out, _uncached_logits(m, ids, am))


def test_prompt_cache_under_inference_mode_then_no_grad(tiny_llama):
    """A cache filled under torch.inference_mode serves a later no_grad forward, and generate's decode steps
    (which read it) give what a full forward gives."""
    m = tiny_llama
    mops_fast.attach(m, MoPsConfig(num_experts=2, prompt_len=3, gate_layer=1, init="random"))
    ids, am = batch()
    with torch.inference_mode():
        a = m(input_ids=ids, attention_mask=am).logits
    with torch.no_grad():
        b = m(input_ids=ids, attention_mask=am).logits
    assert torch.equal(a, b)
    with torch.inference_mode():
        g = m.generate(input_ids=ids[:1], attention_mask=am[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        full = m(input_ids=g[:, :-1]).logits[:, ids.shape[1] - 1:]
    assert torch.equal(full.argmax(-1), g[:, ids.shape[1]:])


def test_whole_model_compiles_fullgraph(tiny_llama):
    # torch.compile(model, fullgraph=True) with MoPs attached: the hooks, the gate and the attention trace
    # without a graph break (the gate's empty-mask check reads values: eager only); the loss and the
    # prompts' and gate's gradients match eager, and so does a decode step on a KV cache
    from transformers import DynamicCache

    m = tiny_llama
    mops_fast.attach(m, MoPsConfig(num_experts=3, prompt_len=2, gate_layer=1, init="random", top_k=2))
    ids, am = batch(B=2)
    torch._dynamo.reset()
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = cm(input_ids=ids, attention_mask=am, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in m.mops.named_parameters()}
    m.zero_grad()
    ref = m(input_ids=ids, attention_mask=am, labels=ids)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss)
    for n, p in m.mops.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)
    with torch.no_grad():
        caches = DynamicCache(), DynamicCache()
        first = [f(input_ids=ids, attention_mask=am, cache=c, use_cache=True).logits for f, c in zip((m, cm), caches)]
        nxt = first[0][:, -1].argmax(-1, keepdim=True)
        am2 = torch.cat([am, torch.ones(2, 1, dtype=am.dtype)], 1)
        step = [f(input_ids=nxt, attention_mask=am2, cache=c, use_cache=True).logits for f, c in zip((m, cm), caches)]
    torch.testing.assert_close(step[1], step[0])


def test_generate_refuses_a_chunked_prefill(tiny_llama):
    # the gate reads the whole prompt before the first injected layer: a chunked prefill would hand it the
    # first chunk only (different gate weights, different tokens), so it is refused, however it is asked for
    import copy

    from transformers import GenerationConfig

    m = tiny_llama
    mops_fast.attach(m, MoPsConfig(num_experts=3, prompt_len=2, gate_layer=1, init="random"))
    ids, am = batch(B=2)
    am[:] = 1
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="prefill_chunk_size=4"):
        m.generate(input_ids=ids, attention_mask=am, prefill_chunk_size=4, **kw)
    with pytest.raises(ValueError, match="prefill_chunk_size=3"):
        m.generate(ids, GenerationConfig(prefill_chunk_size=3, **kw), attention_mask=am)
    out = m.generate(input_ids=ids, attention_mask=am, **kw)
    twin = copy.deepcopy(m)  # the guard is bound to the copy, not to the original
    assert twin.generate.__self__ is twin and torch.equal(twin.generate(input_ids=ids, attention_mask=am, **kw), out)
    mops_fast.detach(m)
    assert "generate" not in vars(m)
    m.generate(input_ids=ids, attention_mask=am, prefill_chunk_size=4, **kw)  # the plain model chunks


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_generate_static_cache_and_embeddings_match_the_dynamic_cache(model_type):
    # generate with a static cache hands the model a prepared 4-D mask (a dict by layer type for Qwen2):
    # the gate must read the same prompt tokens as with the 2-D mask, inputs_embeds the same as ids, and
    # without a cache (every step a forward over prompt and generated tokens) the prompt only
    m = tiny_model(model_type)
    mops_fast.attach(m, MoPsConfig(num_experts=3, prompt_len=2, gate_layer=1, init="random"))
    ids, kw = left_padded_generate(4)
    ref = m.generate(input_ids=ids, **kw)
    for out in (m.generate(input_ids=ids, cache_implementation="static", **kw),
                m.generate(inputs_embeds=m.get_input_embeddings()(ids), **kw),
                m.generate(input_ids=ids, use_cache=False, **kw)):
        for a, b in zip(out.logits, ref.logits):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_generate_keeps_static_cache_generation_eager(tiny_llama, monkeypatch):
    # transformers compiles static-cache generation on GPUs by default; MoPs' compiled decode step has run
    # on the CPU only so far, so generate runs it eagerly unless a compile_config asks for it
    from transformers import CompileConfig
    from transformers.generation.utils import GenerationMixin

    m = tiny_llama
    mops_fast.attach(m, MoPsConfig(num_experts=3, prompt_len=2, gate_layer=1, init="random"))
    seen = []
    real = GenerationMixin._valid_auto_compile_criteria
    monkeypatch.setattr(GenerationMixin, "_valid_auto_compile_criteria",
                        lambda self, kw, cfg: seen.append((cfg.disable_compile, cfg.compile_config)) or real(self, kw, cfg))
    ids, _ = batch(B=2)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0,
              cache_implementation="static")
    m.generate(input_ids=ids, **kw)
    assert seen and all(disabled for disabled, _ in seen)
    seen.clear()
    m.generate(input_ids=ids, compile_config=CompileConfig(backend="eager"), **kw)  # asked: left to transformers
    assert seen and not any(disabled for disabled, _ in seen)


@pytest.mark.parametrize("mode", ["scale", "mix"])
def test_compiled_static_cache_generation_matches_eager(tiny_llama, mode):
    # with a compile_config transformers compiles the decode steps on a static cache (the prefill runs
    # eagerly): the MoPs attention then takes every slot, the unfilled ones masked, and its one query sees
    # every valid key; no host read of the cache length, so one graph serves every step and the next call
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    m = tiny_llama
    mops_fast.attach(m, MoPsConfig(num_experts=3, prompt_len=2, gate_layer=1, init="random", mode=mode))
    ids, kw = left_padded_generate(5)
    am = kw["attention_mask"]
    ref = m.generate(input_ids=ids, **kw)
    cc = CompileConfig(backend="aot_eager", fullgraph=True)
    cc._compile_all_devices = True  # transformers compiles on accelerators only unless told
    torch._dynamo.reset()
    counters.clear()
    for _ in range(2):
        out = m.generate(input_ids=ids, cache_implementation="static", compile_config=cc, **kw)
        for a, b in zip(out.logits, ref.logits):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    # a compiled prefill on a static cache (not what generate does) is refused: the gate reads the prompt
    from transformers import StaticCache

    cache = StaticCache(config=m.config, max_cache_len=16)
    with pytest.raises(Exception, match="must be a decode step"):
        torch.compile(m, fullgraph=True, backend="aot_eager")(input_ids=ids, attention_mask=am, cache=cache)
