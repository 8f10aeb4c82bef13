"""Shared helpers of the end-to-end benchmarks: device slug, timing statistics, the result JSON (DESIGN §6).

A result file is benchmarks/results/<benchmark>-<device slug>.json:
  {"benchmark", "device", "torch", "triton", "cuda", "rows": [{"shape", "impl", "mode", "median_ms",
   "p20_ms", "p80_ms", "peak_mem_bytes", "tokens_per_s"}], ...extra keys}
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from mops_fast.machine import cpu_name, device_name, device_slug, slug  # noqa: E402,F401 (re-exported)

RESULTS = ROOT / "benchmarks" / "results"
DOLLY_TRAIN = ROOT.parent / "shared" / "data" / "dolly15k" / "train.jsonl"


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated quantile (q in [0, 1]) of a non-empty list."""
    s = sorted(xs)
    if not s:
        raise ValueError("quantile of an empty list")
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def stats_ms(times_s: list[float]) -> dict:
    ms = [t * 1e3 for t in times_s]
    return {"median_ms": statistics.median(ms), "p20_ms": quantile(ms, 0.2), "p80_ms": quantile(ms, 0.8),
            "n": len(ms)}


def make_row(shape: dict, impl: str, mode: str, times_s: list[float], tokens: int | None = None,
             peak_mem_bytes: int | None = None, **extra) -> dict:
    """One §6 row; tokens_per_s = tokens / median time when `tokens` (per timed call) is given."""
    row = {"shape": shape, "impl": impl, "mode": mode, **stats_ms(times_s), "peak_mem_bytes": peak_mem_bytes}
    if tokens is not None:
        row["tokens_per_s"] = tokens / (row["median_ms"] / 1e3)
    row.update(extra)
    return row


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def result_doc(benchmark: str, rows: list[dict], device: str = "cpu", **extra) -> dict:
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    doc = {"benchmark": benchmark, "device": device_name(device), "torch": torch.__version__, "triton": triton_v,
           "cuda": torch.version.cuda, "rows": rows, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if not device.startswith("cuda"):
        doc["load_average"] = load_average()  # the CPU here may be shared: say how busy it was
    doc.update(extra)
    return doc


def write_result(doc: dict, out_dir: str | Path | None = None, device: str = "cpu") -> Path:
    out = Path(out_dir) if out_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{doc['benchmark']}-{device_slug(device)}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def time_interleaved(fns: dict, reps: int, warmup: int = 1, sync=None) -> dict[str, list[float]]:
    """Seconds per call of each fn, the implementations alternating rep by rep, so that load from other
    processes on a shared machine falls on all of them alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
            if sync:
                sync()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            if sync:
                sync()
            t = time.perf_counter()
            f()
            if sync:
                sync()
            times[k].append(time.perf_counter() - t)
    return times


def maxrss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def dolly_windows(tokenizer, batch: int, seq: int, seed: int = 0, path: Path | None = None) -> dict:
    """B fixed-length windows of real dolly text (records in chat format, concatenated), the first half of
    each window labelled as prompt (gate mask, no loss) and the second half as response (loss): every
    implementation then trains on the same tokens with the same number of loss positions."""
    from mops_fast.train.data import load_records, prompt_text

    recs = load_records(path or DOLLY_TRAIN, limit=400)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(recs), generator=g).tolist()
    stream: list[int] = []
    need = batch * seq
    for i in order:
        r = recs[i]
        text = prompt_text(tokenizer, r) + r["response"].strip() + (tokenizer.eos_token or "")
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ValueError(f"not enough text for {batch} x {seq} tokens")
    ids = torch.tensor(stream[:need]).view(batch, seq)
    half = seq // 2
    labels = ids.clone()
    labels[:, :half] = -100
    gate = torch.zeros_like(ids)
    gate[:, :half] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "gate_mask": gate}


def bench_cuda_graph(fns: list, calls: int = 24, quantiles=(0.5, 0.2, 0.8)) -> list[float]:
    """Milliseconds of one call (median, p20, p80 by default), timed as replays of a CUDA graph that holds
    `calls` calls cycling through `fns`. Small-batch kernels take microseconds, less than Python takes
    to launch them, so eager timing measures the host; a graph (as decode loops capture) leaves the
    device's time. Give `fns` as the same call on different input copies whose bytes together exceed the
    L2 cache, or the replays read a warm cache that a model's next layer would not leave behind."""
    from triton.testing import do_bench

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture: compiles, allocator pools, handles
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    times = do_bench(graph.replay, warmup=20, rep=100, quantiles=list(quantiles))
    del graph
    return [t / calls for t in times]


def copies_beyond_l2(bytes_per_set: int, l2_bytes: int | None = None, at_most: int = 16) -> int:
    """How many copies of an input set bring the bytes a graph cycles through to twice the L2 cache."""
    if l2_bytes is None:
        l2_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(1, min(at_most, -(-2 * l2_bytes // max(bytes_per_set, 1))))


def weight_copies(packed, W16, graphs: bool = True):
    """(int4 sets, fp16 weights): the packed weight (qweight, qzeros, scales, g_idx) and its fp16
    dequantization, each copied until a graph cycling through the copies reads beyond twice the L2 cache
    (one of each, no CUDA query, when not timing graphs)."""
    n_q = copies_beyond_l2(packed[0].numel() * 4 + packed[2].numel() * 2) if graphs else 1
    n_h = copies_beyond_l2(W16.numel() * 2) if graphs else 1
    return ([packed] + [tuple(t.clone() for t in packed) for _ in range(n_q - 1)],
            [W16] + [W16.clone() for _ in range(n_h - 1)])


def random_int4_layer(K: int, N: int, group: int = 128, seed: int = 0, device="cpu"):
    """A random 4-bit GPTQ layer without act-order, ((qweight, qzeros, scales fp16, g_idx), its dense fp32
    weight (N, K)), both on `device`: uniform codes and zero points, scales in [0.001, 0.011)."""
    from mops_fast.quant.pack import pack_gptq

    g = torch.Generator().manual_seed(seed)
    G = -(-K // group)
    codes = torch.randint(0, 16, (N, K), generator=g)
    zeros = torch.randint(0, 16, (G, N), generator=g)
    scales = (torch.rand(G, N, generator=g) * 0.01 + 0.001).half()
    g_idx = (torch.arange(K) // group).to(torch.int32)
    gi = g_idx.long()
    W = (codes - zeros[gi].t()).float() * scales.float()[gi].t()
    return [t.to(device) for t in pack_gptq(codes, zeros, scales, g_idx, 4)], W.to(device)
