"""MoPs on a CUDA model: the fused attention path equals the CPU reference path, forward and backward."""
import pytest
import torch

import mops_fast
from tests.conftest import tiny_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("mode", ["scale", "mix"])
def test_cuda_model_matches_cpu_reference(mode):
    cpu = tiny_model(layers=4, hidden=256, heads=4, kv_heads=2)  # head dim 64
    mops_fast.attach(cpu, mops_fast.MoPsConfig(num_experts=3, prompt_len=5, gate_layer=1, init="random",
                                               mode=mode, top_k=2))
    gpu = tiny_model(layers=4, hidden=256, heads=4, kv_heads=2)
    mops_fast.attach(gpu, mops_fast.MoPsConfig(num_experts=3, prompt_len=5, gate_layer=1, init="random",
                                               mode=mode, top_k=2))
    gpu.mops.load_state_dict(cpu.mops.state_dict())
    gpu.cuda()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (3, 77), generator=g)
    am = torch.ones(3, 77, dtype=torch.long)
    am[1, :5] = 0
    am[2, -9:] = 0
    out_c = cpu(input_ids=ids, attention_mask=am, labels=ids)
    out_g = gpu(input_ids=ids.cuda(), attention_mask=am.cuda(), labels=ids.cuda())
    valid = am.bool()
    torch.testing.assert_close(out_g.logits.cpu()[valid], out_c.logits[valid], rtol=2e-3, atol=2e-3)
    out_c.loss.backward()
    out_g.loss.backward()
    for (n, pc), (_, pg) in zip(cpu.mops.named_parameters(), gpu.mops.named_parameters()):
        torch.testing.assert_close(pg.grad.cpu(), pc.grad, rtol=5e-3, atol=5e-4, msg=n)


def test_generate_on_cuda_bf16():
    m = tiny_model(layers=4, hidden=256, heads=4, kv_heads=2).to("cuda", torch.bfloat16)
    mops_fast.attach(m, mops_fast.MoPsConfig(num_experts=4, prompt_len=4, gate_layer=1, init="random"))
    ids = torch.randint(0, 128, (2, 20), device="cuda")
    out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                     pad_token_id=0)
    assert out.shape == (2, 28)


@pytest.mark.parametrize("mode", ["scale", "mix"])
def test_generate_with_a_static_cache_matches_the_dynamic_cache_on_cuda(mode):
    # a static cache hands the fused kernels strided views of its filled slots and a 4-D mask
    m = tiny_model(layers=4, hidden=256, heads=4, kv_heads=2).cuda()
    mops_fast.attach(m, mops_fast.MoPsConfig(num_experts=3, prompt_len=4, gate_layer=1, init="random", mode=mode))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (2, 20), generator=g).cuda()
    am = torch.ones_like(ids)
    am[1, :6] = 0  # left padded
    outs = [m.generate(input_ids=ids, attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0,
                       output_logits=True, return_dict_in_generate=True, **extra)
            for extra in ({}, {"cache_implementation": "static"})]
    for a, b in zip(outs[0].logits, outs[1].logits):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adapter_bank_on_cuda_matches_each_adapter_alone(tmp_path, dtype):
    # per-sample prompts and the backbone-only rows through the fused kernels, against each adapter alone
    cfg = dict(num_experts=3, prompt_len=5, gate_layer=1, init="random", top_k=2)
    dirs = {}
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        m = tiny_model(layers=4, hidden=256, heads=4, kv_heads=2)
        mops_fast.attach(m, mops_fast.MoPsConfig(**cfg))
        dirs[name] = mops_fast.save_adapter(m, tmp_path / name)

    def model():
        return tiny_model(layers=4, hidden=256, heads=4, kv_heads=2).to("cuda", dtype)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (3, 77), generator=g).cuda()
    am = torch.ones(3, 77, dtype=torch.long, device="cuda")
    am[1, :5] = 0
    server = model()
    mops_fast.add_adapter(server, "a", dirs["a"])
    mops_fast.add_adapter(server, "b", dirs["b"])
    request = ["b", None, "a"]
    with torch.no_grad(), mops_fast.using_adapters(server, request):
        out = server(input_ids=ids, attention_mask=am).logits
    for i, name in enumerate(request):
        ref_model = model()
        if name is not None:
            mops_fast.load_adapter(ref_model, dirs[name])
        with torch.no_grad():
            ref = ref_model(input_ids=ids, attention_mask=am).logits
        valid = am[i].bool()
        torch.testing.assert_close(out[i][valid].float(), ref[i][valid].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("shape", [(2, 37), (1, 7)])  # 74 rows take the Triton int4 kernels, 7 the small-M ones
def test_lora_on_an_int4_cuda_backbone_matches_the_cpu_path(shape):
    # what a user runs: a GPTQ backbone in fp16 on the GPU, LoRA (fp32) through PEFT calling our QuantLinear
    pytest.importorskip("peft")
    import copy

    from mops_fast.hf.lora import LoraSettings, attach_lora
    from mops_fast.quant.compress import QuantSettings, quantize_model, replace_with_quant_linear

    base = tiny_model(layers=2, hidden=256, heads=4, kv_heads=2)
    calib = torch.randint(1, 128, (8, 48), generator=torch.Generator().manual_seed(0))
    replace_with_quant_linear(base, quantize_model(base, calib, "gptq", QuantSettings(4, 64), log=None))
    cpu, gpu = copy.deepcopy(base), copy.deepcopy(base).to("cuda", torch.float16)
    settings = LoraSettings(r=4, target_modules=["q_proj", "v_proj"])
    attach_lora(cpu, settings, seed=0)
    attach_lora(gpu, settings, seed=0)
    with torch.no_grad():
        for n, p in cpu.named_parameters():
            if "lora_B" in n:  # B starts at 0; give LoRA an effect on the output to compare
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
        g_params = dict(gpu.named_parameters())
        for n, p in cpu.named_parameters():
            if ".lora_" in n:
                assert g_params[n].dtype == torch.float32 and g_params[n].is_cuda, n
                g_params[n].copy_(p)
    ids = torch.randint(1, 128, shape, generator=torch.Generator().manual_seed(1))
    out_c = cpu(input_ids=ids, labels=ids)
    out_g = gpu(input_ids=ids.cuda(), labels=ids.cuda())
    scale = out_c.logits.abs().max().item()
    torch.testing.assert_close(out_g.logits.float().cpu(), out_c.logits, rtol=0, atol=2e-2 * scale)
    out_c.loss.backward()
    out_g.loss.backward()
    grads = [(n, p.grad) for n, p in cpu.named_parameters() if p.requires_grad]
    assert len(grads) == 8 and all(".lora_" in n for n, _ in grads)
    for n, gc in grads:
        gg = g_params[n].grad
        assert gg is not None and gg.dtype == torch.float32, n
        torch.testing.assert_close(gg.cpu(), gc, rtol=0, atol=3e-2 * gc.abs().max().item(), msg=n)


def test_whole_model_compiles_fullgraph_on_cuda():
    # the fused attention's custom ops and their fake implementations inside a whole-model graph
    m = tiny_model(layers=4, hidden=256, heads=4, kv_heads=2).cuda()
    mops_fast.attach(m, mops_fast.MoPsConfig(num_experts=3, prompt_len=4, gate_layer=1, init="random", top_k=2))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (2, 40), generator=g).cuda()
    am = torch.ones_like(ids)
    am[1, :7] = 0
    torch._dynamo.reset()
    out = torch.compile(m, fullgraph=True, backend="aot_eager")(input_ids=ids, attention_mask=am, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in m.mops.named_parameters()}
    m.zero_grad()
    ref = m(input_ids=ids, attention_mask=am, labels=ids)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-4, atol=1e-4)
    for n, p in m.mops.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-3, atol=1e-5, msg=n)


def test_compiled_static_cache_generation_on_cuda():
    # transformers' own compile of static-cache decoding (Inductor, CUDA graphs) with MoPs: the attention
    # takes every slot through the fused kernels' custom op; the logits of eager dynamic-cache generate
    from transformers import CompileConfig

    m = tiny_model(layers=4, hidden=256, heads=4, kv_heads=2).cuda()
    mops_fast.attach(m, mops_fast.MoPsConfig(num_experts=3, prompt_len=4, gate_layer=1, init="random"))
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 128, (2, 20), generator=g).cuda()
    am = torch.ones_like(ids)
    am[1, :6] = 0
    kw = dict(attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    ref = m.generate(input_ids=ids, **kw)
    torch._dynamo.reset()
    out = m.generate(input_ids=ids, cache_implementation="static", compile_config=CompileConfig(), **kw)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
