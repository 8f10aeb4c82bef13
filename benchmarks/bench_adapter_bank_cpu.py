"""Serving several adapters at once on the CPU: SmolLM2-135M fp32, A = 4 MoPs adapters (J = 8, L = 8,
random weights: speed does not depend on them), one request each of a 64-token prompt, greedy
generate() of 32 new tokens.

  per_adapter    what a server without a bank does: one generate (B = 1) a request, each on a model
                 holding that request's adapter as its own (no swap cost counted)
  bank           the four requests in one generate (B = 4), each through its own adapter
                 (mops_fast.add_adapter + using_adapters)
  same_adapter   the four requests in one generate through one adapter: the batch the bank is held to

  python benchmarks/bench_adapter_bank_cpu.py [--reps 3] [--out DIR]  -> DIR/adapter_bank_cpu-<device slug>.json
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

A, J, L, PROMPT_LEN, NEW_TOKENS = 4, 8, 8, 64, 32


def build(workdir: Path) -> dict:
    """impl -> a callable running its generate()s over the same A requests."""
    import mops_fast
    from mops_fast import MoPsConfig

    names = [f"owner{i}" for i in range(A)]
    models = []
    for i, name in enumerate(names):
        m, tok = mops_fast.load_model("smollm2-135m", dtype=torch.float32)
        torch.manual_seed(i)
        mops_fast.attach(m, MoPsConfig(num_experts=J, prompt_len=L, init="random", init_scale=0.3))
        mops_fast.save_adapter(m, workdir / name)
        models.append(m.eval())
    server = models[0]  # holds owner0 as its own, and every adapter in its bank
    for name in names:
        mops_fast.add_adapter(server, name, workdir / name)
    ids = common.dolly_windows(tok, A, PROMPT_LEN, seed=1)["input_ids"]
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)

    def generate(model, x):
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
        if out.shape[1] != PROMPT_LEN + NEW_TOKENS:
            raise RuntimeError(f"generate returned {out.shape[1] - PROMPT_LEN} new tokens, not {NEW_TOKENS}")
        return out

    @torch.no_grad()
    def per_adapter():
        return [generate(models[i], ids[i:i + 1]) for i in range(A)]

    @torch.no_grad()
    def bank():
        with mops_fast.using_adapters(server, names):
            return generate(server, ids)

    @torch.no_grad()
    def same_adapter():
        return generate(server, ids)

    # the bank's answer for each request is the one its own model gives alone
    together, alone = bank(), per_adapter()
    for i in range(A):
        if not torch.equal(together[i], alone[i][0]):
            raise RuntimeError(f"request {i}: the bank generated other tokens than its adapter alone")
    return {"per_adapter": per_adapter, "bank": bank, "same_adapter": same_adapter}


def measure(reps: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        fns = build(Path(d))
        times = common.time_interleaved(fns, reps=reps, warmup=1)
    shape = {"model": "smollm2-135m", "dtype": "float32", "adapters": A, "requests": A, "J": J, "L": L,
             "prompt": PROMPT_LEN, "new_tokens": NEW_TOKENS}
    rows = [common.make_row(shape, impl, "generate", times[impl], tokens=A * NEW_TOKENS) for impl in fns]
    tps = {r["impl"]: r["tokens_per_s"] for r in rows}
    return common.result_doc(
        "adapter_bank_cpu", rows, timing=f"interleaved, median of {reps} after 1 warm-up",
        baseline_impl="per_adapter", bank_vs_per_adapter_tokens_per_s=tps["bank"] / tps["per_adapter"],
        bank_vs_same_adapter_tokens_per_s=tps["bank"] / tps["same_adapter"],
        notes="tokens_per_s counts the new tokens of all four requests; the bank's tokens are checked equal "
              "to each adapter's own generate before timing.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    doc = measure(a.reps)
    path = common.write_result(doc, a.out)
    for r in doc["rows"]:
        print(f"{r['impl']:>13}: {r['median_ms']:8.0f} ms  {r['tokens_per_s']:7.1f} tokens/s")
    for k, v in doc.items():
        if "_vs_" in k:
            print(f"{k} = {v:.3f}")
    print(f"load average {doc['load_average']}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
