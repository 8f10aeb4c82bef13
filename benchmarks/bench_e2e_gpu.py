"""End to end on one GPU: mops_fast (fused gated-prefix attention) against transformers + PEFT prefix tuning
on a LLaMA-shaped random model in bf16.

  shape 7b (default): hidden 4096, 32 layers, 32 heads, 8 kv heads, MLP 11008, vocab 32000 (~6.7e9
  parameters, 13.5 GB bf16); shape 1b: hidden 2048, 16 layers, 32 heads, 8 kv heads, MLP 5632.
  train step  B=4, S=1024 random tokens, the second half labelled; J=8 x L=8 = 64 prompt tokens for
              both; mops through mops_fast's Trainer loss path (`response_nll`), PEFT through the HF loss;
              `lora` (PEFT LoRA r 8 on q_proj and v_proj, fp32, through `mops_fast.attach_lora` and the same
              loss path as mops): the outside reference users weigh MoPs against;
              tokens/s (implementations alternating step by step, CUDA-synchronized) and peak allocated memory
  generate    greedy, 128-token prompt, 32 new tokens, B in {1, 8}: tokens/s for `dense`, `mops`, `peft`
  4-bit       the same model RTN-quantized in memory (mops_fast.quant, group 128, sym) into QuantLinear
              layers: `rtn4+mops` and `rtn4+lora` train steps and `rtn4` / `rtn4+mops` generate, as time allows

A time budget (default 90 s) keeps the whole run under 100 s on an H100: parts that do not fit are listed
in the JSON under "skipped". Writes DIR/e2e_gpu-<gpu slug>.json (DESIGN §6).

  python3 benchmarks/bench_e2e_gpu.py --out DIR [--shape 7b|1b] [--budget-s 90]
  python3 benchmarks/bench_e2e_gpu.py --smoke-cpu      # tiny shape on the CPU: checks the code path only
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256),
}
J, L = 8, 8


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds, self.skipped = time.time(), seconds, []

    def left(self) -> float:
        return self.seconds - (time.time() - self.t0)

    def allow(self, what: str, need_s: float) -> bool:
        if self.left() < need_s:
            self.skipped.append(f"{what} (needs ~{need_s:.0f} s, {max(0.0, self.left()):.0f} s left)")
            print(f"skipped: {self.skipped[-1]}", flush=True)
            return False
        return True


def build_model(shape: str, device: str, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # built on the device: no 27 GB fp32 copy on the host
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def make_batch(vocab: int, B: int, S: int, device: str) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (B, S), generator=g)
    labels = ids.clone()
    labels[:, : S // 2] = -100
    gate = torch.zeros_like(ids)
    gate[:, : S // 2] = 1
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                           "labels": labels, "gate_mask": gate}.items()}


def adam_step(params, loss_fn):
    """One AdamW step (clipped at 1.0) of `params` on `loss_fn()`: every implementation's training step."""
    opt = torch.optim.AdamW(params, lr=3e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return step


def nll_step(model, batch, params):
    """mops_fast's Trainer loss path, the response NLL (mops and LoRA alike)."""
    from mops_fast.train.loss import response_nll

    n_tok = int((batch["labels"][:, 1:] != -100).sum())
    return adam_step(params, lambda: response_nll(model, batch)[0] / n_tok)


def mops_step(model, batch):
    return nll_step(model, batch, [p for p in model.mops.parameters() if p.requires_grad])


def peft_step(pm, batch):
    """The HF loss path (all labelled positions through the model's own loss)."""
    return adam_step([p for p in pm.parameters() if p.requires_grad],
                     lambda: pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                labels=batch["labels"]).loss)


def gen_fn(model, ids, new_tokens):
    @torch.no_grad()
    def run():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
        if out.shape[1] != ids.shape[1] + new_tokens:
            raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens, not {new_tokens}")

    return run


def timed(fn, reps, sync, reset_peak, peak):
    """(seconds per call, peak allocated bytes) after one warm-up call."""
    fn()
    sync()
    reset_peak()
    ts = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return ts, peak()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="result folder (default benchmarks/results)")
    ap.add_argument("--shape", choices=("7b", "1b"), default="7b")
    ap.add_argument("--budget-s", type=float, default=90.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--smoke-cpu", action="store_true", help="tiny model on the CPU (code-path check, fp32)")
    a = ap.parse_args(argv)
    if a.smoke_cpu:
        device, dtype, shape, B, S, P, NEW, GEN_B = "cpu", torch.float32, "smoke", 2, 32, 16, 4, (1, 2)
    else:
        if not torch.cuda.is_available():
            print("bench_e2e_gpu needs a CUDA GPU (use --smoke-cpu to check the code path on the CPU)", file=sys.stderr)
            return 2
        device, dtype, shape, B, S, P, NEW, GEN_B = "cuda", torch.bfloat16, a.shape, 4, 1024, 128, 32, (1, 8)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    reset_peak = torch.cuda.reset_peak_memory_stats if cuda else (lambda: None)
    peak = torch.cuda.max_memory_allocated if cuda else (lambda: None)
    budget = Budget(float("inf") if a.smoke_cpu else a.budget_s)  # the smoke run checks every part
    from mops_fast import MoPsConfig, attach, detach

    model = build_model(shape, device, dtype)
    sync()
    nparams = sum(p.numel() for p in model.parameters())
    print(f"model {shape}: {nparams / 1e9:.2f}e9 parameters, built in {time.time() - budget.t0:.1f} s", flush=True)
    vocab = SHAPES[shape]["vocab_size"]
    batch = make_batch(vocab, B, S, device)
    prompts = {b: make_batch(vocab, b, P, device)["input_ids"] for b in GEN_B}
    tshape = {"model": f"llama-{shape}-random", "dtype": str(dtype).replace("torch.", ""), "B": B, "S": S,
              "prompt_tokens": J * L}
    rows, errors = [], {}

    def gshape(b):
        return {"model": f"llama-{shape}-random", "B": b, "prompt": P, "new_tokens": NEW}

    def write(final=False):
        tps = {(r["impl"], r["mode"], r["shape"]["B"]): r["tokens_per_s"] for r in rows}
        summary = {}
        for ref in ("peft", "lora"):
            if ("mops", "step", B) in tps and (ref, "step", B) in tps:
                summary[f"mops_vs_{ref}_train_tokens_per_s"] = tps[("mops", "step", B)] / tps[(ref, "step", B)]
        for b in GEN_B:
            if ("mops", "generate", b) in tps and ("peft", "generate", b) in tps:
                summary[f"mops_vs_peft_generate_B{b}_tokens_per_s"] = tps[("mops", "generate", b)] / tps[("peft", "generate", b)]
        doc = common.result_doc(
            "e2e_gpu" if cuda else "e2e_gpu_smoke", rows, device=device, baseline_impl="peft",
            model_shape=shape, parameters=nparams, skipped=budget.skipped, errors=errors, complete=final,
            wall_s=round(time.time() - budget.t0, 1), timing=f"median of {a.reps} (train) / {min(a.reps, 2)} "
            "(generate) after 1 warm-up, synchronized",
            notes="Random LLaMA-shaped weights (speed only). mops: fused Triton gated-prefix attention on CUDA, "
                  "prompts in layers g..N-1; peft: PrefixTuningConfig(64 virtual tokens), all layers, HF loss over "
                  "all positions; lora: PEFT LoRA r 8 (q_proj, v_proj), fp32 adapters, mops' loss path; rtn4: "
                  "round-to-nearest 4-bit g128 QuantLinear (int4 GPTQ matmul kernels).",
            **summary)
        return common.write_result(doc, a.out, device=device), doc

    def record(label, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one failing part must not lose the others' numbers
            errors[label] = f"{type(e).__name__}: {e}"
            print(f"{label} failed: {errors[label]}", flush=True)
        write()  # a run killed by its time limit still leaves every finished part on disk

    def bench_train(impl, step):
        ts, pk = timed(step, a.reps, sync, reset_peak, peak)
        rows.append(common.make_row(tshape, impl, "step", ts, tokens=B * S, peak_mem_bytes=pk))
        print(f"step {impl:>10}: {rows[-1]['median_ms']:8.1f} ms  {rows[-1]['tokens_per_s']:9.0f} tokens/s", flush=True)

    def bench_gen(impl, m):
        for b in GEN_B:
            if not budget.allow(f"generate {impl} B={b}", 8 if cuda else 0):
                continue
            ts, pk = timed(gen_fn(m, prompts[b], NEW), min(a.reps, 2), sync, reset_peak, peak)
            rows.append(common.make_row(gshape(b), impl, "generate", ts, tokens=b * NEW, peak_mem_bytes=pk))
            print(f"generate {impl:>10} B={b}: {rows[-1]['median_ms']:8.1f} ms  {rows[-1]['tokens_per_s']:8.0f} tokens/s",
                  flush=True)

    mcfg = MoPsConfig(num_experts=J, prompt_len=L)
    # 1. dense generate, then MoPs (train + generate)
    record("dense generate", lambda: bench_gen("dense", model))

    def mops_part():
        attach(model, mcfg)
        try:
            model.train()
            if budget.allow("mops train step", 10 if cuda else 0):
                bench_train("mops", mops_step(model, batch))
            model.eval()
            bench_gen("mops", model)
        finally:
            detach(model)
            model.zero_grad(set_to_none=True)

    record("mops", mops_part)
    if cuda:
        torch.cuda.empty_cache()

    # 2. PEFT prefix tuning on the same weights
    def peft_part():
        from peft import PrefixTuningConfig, get_peft_model

        pm = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=J * L))
        pm.train()
        if budget.allow("peft train step", 10 if cuda else 0):
            bench_train("peft", peft_step(pm, batch))
        pm.eval()
        bench_gen("peft", pm)

    # PEFT prefix tuning feeds its prefix as past_key_values and leaves the wrapped model's modules as they
    # are, so the plain model below is unchanged by it.
    record("peft", peft_part)
    if cuda:
        torch.cuda.empty_cache()

    # 3. LoRA on the same weights (the outside reference), trained like mops
    def lora_part(impl="lora"):
        from mops_fast import LoraSettings, attach_lora, detach_adapter
        from mops_fast.hf.lora import lora_parameters

        attach_lora(model, LoraSettings(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
        try:
            model.train()
            bench_train(impl, nll_step(model, batch, lora_parameters(model)))
        finally:
            model.eval()
            detach_adapter(model)
            model.zero_grad(set_to_none=True)

    if budget.allow("lora train step", 10 if cuda else 0):
        record("lora", lora_part)
    if cuda:
        torch.cuda.empty_cache()

    # 4. 4-bit: RTN-quantize the same model in memory into QuantLinear layers
    def quant_part():
        from mops_fast.quant.compress import QuantSettings, quantize_model, replace_with_quant_linear

        t = time.time()
        quants = quantize_model(model, None, "rtn", QuantSettings(bits=4, group_size=128, sym=True))
        replace_with_quant_linear(model, quants)
        del quants
        if cuda:
            torch.cuda.empty_cache()
        sync()
        print(f"RTN 4-bit in memory: {time.time() - t:.1f} s", flush=True)
        bench_gen("rtn4", model)
        attach(model, mcfg)
        try:
            model.train()
            if budget.allow("rtn4+mops train step", 12 if cuda else 0):
                bench_train("rtn4+mops", mops_step(model, batch))
            model.eval()
            bench_gen("rtn4+mops", model)
        finally:
            detach(model)
            model.zero_grad(set_to_none=True)
        if budget.allow("rtn4+lora train step", 10 if cuda else 0):
            lora_part("rtn4+lora")

    if budget.allow("4-bit part", 25 if cuda else 0):
        record("rtn4", quant_part)

    path, doc = write(final=True)
    summary = {k: v for k, v in doc.items() if "_vs_" in k}
    for k, v in summary.items():
        print(f"{k} = {v:.3f}")
    print(f"wrote {path} in {doc['wall_s']} s", flush=True)
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
