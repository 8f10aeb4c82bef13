"""benchmarks/report.py and benchmarks/common.py on small synthetic result files."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import common  # noqa: E402
import report  # noqa: E402


def _row(shape, impl, mode, med, tps=None, mem=None):
    return {"shape": shape, "impl": impl, "mode": mode, "median_ms": med, "p20_ms": med * 0.9,
            "p80_ms": med * 1.1, "peak_mem_bytes": mem, "tokens_per_s": tps}


@pytest.fixture
def results(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    train = {"benchmark": "train_step_cpu", "device": "Test CPU (2 threads)", "torch": "2.13", "triton": None,
             "cuda": None, "load_average": [1.5, 1.0, 0.5], "mops_vs_peft_tokens_per_s": 1.25, "target_ratio": 0.9,
             "rows": [_row({"B": 4, "S": 256}, "mops", "step", 3200.0, 320.0, 2 * 2**20),
                      _row({"B": 4, "S": 256}, "peft", "step", 4000.0, 256.0, 3 * 2**20)]}
    mm = {"benchmark": "gptq_matmul", "device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "triton": "3.6", "cuda": "12.8",
          "rows": [_row({"M": m, "K": 4096, "N": 11008}, impl, "fwd", med, m / (med / 1e3))
                   for m in (1, 16, 4096) for impl, med in (("fused", 0.02 * m ** 0.5), ("fp16", 0.05 * m ** 0.5))]}
    (d / "train_step_cpu-cpu-test-2t.json").write_text(json.dumps(train))
    (d / "gptq_matmul-nvidia-h100.json").write_text(json.dumps(mm))
    (d / "broken.json").write_text("{not json")
    pyb = {"machine_info": {"cpu": {"brand_raw": "Test CPU"}}, "datetime": "2026-01-01",
           "benchmarks": [{"name": "test_train_step_cpu[mops]", "group": "train", "stats": {"rounds": 3, "median": 3.2,
                                                                                          "min": 3.0, "max": 3.5}}]}
    (d / "pytest-benchmark-cpu.json").write_text(json.dumps(pyb))
    cats = {"closed_qa": 8.0, "open_qa": 20.0}
    qual = {"benchmark": "compression_quality", "device": "Test CPU (2 threads)", "torch": "2.13",
            "eval": {"records": 4, "per_category": 2, "max_length": 256},
            "runs": {"dense": {"settings": None, "ppl": {**cats, "mean": 14.0}},
                     "rtn4_g32_asym": {"settings": {"method": "rtn", "bits": 4, "group_size": 32, "sym": False},
                                       "ppl": {**cats, "mean": 15.4}, "mean_ppl_vs_dense": 0.1}}}
    (d / "compression_quality-cpu.json").write_text(json.dumps(qual))
    return d


def test_report_tables_speedups_missing_and_plots(results, tmp_path):
    out, img = tmp_path / "docs" / "benchmarks.md", tmp_path / "docs" / "img"
    text = report.render(results, out, img)
    assert out.read_text() == text
    # train-step table: numbers as in the JSON, speedup vs the peft baseline = 4000/3200
    assert "| B=4 S=256 | mops | step | 3200.000 | 2880.000-3520.000 | 320.0 | 2.0 | 1.25x |" in text
    assert "| B=4 S=256 | peft | step | 4000.000 | 3600.000-4400.000 | 256.0 | 3.0 | 1.00x (baseline) |" in text
    assert "mops vs peft tokens per s: **1.250** (target >= 0.9; met)" in text
    assert "load average at the end [1.5, 1.0, 0.5]" in text
    # matmul: speedup vs fp16 is 0.05/0.02 = 2.5 at every M
    assert text.count("| 2.50x |") == 3
    # GPU benchmarks without files and the e2e suites are listed; the broken file is named
    for b in ("e2e_gpu", "gated_prefix_attention", "int4_cuda_small_m", "e2e_cpu", "quant_cpu"):
        assert f"- `{b}` (" in text
    assert "- `gptq_matmul` (" not in text
    assert "broken.json: unreadable" in text
    assert "| test_train_step_cpu[mops] | train | 3 | 3.2000 |" in text
    # the compression-quality file is a table of perplexities, not an unusable file
    assert "## Compression quality (`compression_quality-cpu.json`) on Test CPU (2 threads)" in text
    assert "| `rtn4_g32_asym` | RTN, 4-bit g32 asym | 15.400 | +10.0% |" in text
    assert "compression_quality-cpu.json: neither" not in text
    # figures name their device
    assert (img / "gptq_matmul-nvidia-h100-speedup.png").is_file()
    assert (img / "gptq_matmul-nvidia-h100-tokens.png").is_file()
    assert "*speedup vs shape, NVIDIA H100 80GB HBM3*" in text
    assert not (img / "train_step_cpu-cpu-test-2t-tokens.png").exists()  # one batch size: no curve


def test_report_with_no_results(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    text = report.render(d, tmp_path / "b.md", tmp_path / "img")
    assert all(f"- `{b}` (" in text for b in report.KNOWN)


def test_baseline_named_by_the_file_wins():
    doc = {"baseline_impl": "b", "rows": [_row({"B": 1}, "a", "fwd", 1.0), _row({"B": 1}, "b", "fwd", 3.0),
                                          _row({"B": 1}, "fp16", "fwd", 2.0)]}
    sp = {s["impl"]: s["speedup"] for s in report.speedups(doc)}
    assert sp == {"a": 3.0, "fp16": 1.5}


def test_common_stats_and_rows(tmp_path):
    assert common.quantile([4, 1, 3, 2, 5], 0.5) == 3
    assert common.quantile([1, 2], 0.2) == pytest.approx(1.2)
    row = common.make_row({"B": 2}, "x", "step", [0.5, 0.25, 1.0], tokens=100)
    assert row["median_ms"] == 500.0 and row["tokens_per_s"] == pytest.approx(200.0)
    assert row["p20_ms"] == pytest.approx(350.0) and row["p80_ms"] == pytest.approx(800.0)
    doc = common.result_doc("unit", [row])
    assert doc["rows"] == [row] and doc["device"] and doc["load_average"] is not None
    p = common.write_result(doc, tmp_path)
    assert p.name == f"unit-{common.device_slug()}.json" and json.loads(p.read_text())["benchmark"] == "unit"
    assert common.device_slug().startswith("cpu-") and common.device_slug().endswith(f"-{common.torch.get_num_threads()}t")
    with pytest.raises(ValueError):
        common.quantile([], 0.5)


def test_dolly_windows_half_prompt_half_response():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    if not common.DOLLY_TRAIN.is_file():
        pytest.skip("shared dolly data not present")
    vocab = {chr(i): i for i in range(32, 127)}
    vocab["[UNK]"] = 0
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="[UNK]")
    b = common.dolly_windows(tok, 2, 32)
    assert b["input_ids"].shape == (2, 32)
    assert (b["labels"][:, :16] == -100).all() and (b["labels"][:, 16:] == b["input_ids"][:, 16:]).all()
    assert (b["gate_mask"][:, :16] == 1).all() and (b["gate_mask"][:, 16:] == 0).all()


def test_decide_int4_reads_a_tune_file():
    """decide_int4 names the forward steps variant and the K split that win on every shape in an M bracket
    (not ones that win on some), measured against the dispatch's default launch (steps=0 with PDL), and PDL's
    median effect, from rows shaped like tune_int4_gpu.py's."""
    import decide_int4

    rows = []
    for K, N in ((4096, 4096), (4096, 11008)):
        rows.append({"shape": {"M": 0, "K": K, "N": N}, "impl": "read[ksplit=1]", "mode": "read",
                     "median_ms": 0.005, "tb_per_s": 1.7})
        for M in (1, 16):
            rows.append(_row({"M": M, "K": K, "N": N}, "fp16", "fwd", 0.030))
            rows.append(_row({"M": M, "K": K, "N": N}, "fp16", "bwd", 0.032))
            times = {"native[steps=0,gs=128,pdl]": 0.016, "native[steps=0,gs=0,pdl]": 0.010,
                     "native[steps=0,gs=128]": 0.0165,
                     "native[steps=4,gs=128,pdl]": 0.0158 if M == 1 else 0.016,
                     "native[steps=22,gs=128,pdl]": 0.014 if M == 16 else 0.017,
                     "native[steps=0,ksplit=4,gs=128,pdl]": 0.012 if M == 1 else 0.015,
                     "native[steps=0,ksplit=2,gs=128,pdl]": 0.013 if (M == 1 or N == 4096) else 0.017,
                     "native[steps=0,prefetch=16,gs=128,pdl]": 0.0150 if N == 4096 else 0.0155,
                     "native[steps=0,ksplit=4,prefetch=16,gs=128,pdl]": 0.007,  # two knobs at once: reported only
                     "native[steps=0,warps=4,ksplit=4,gs=128,pdl]": 0.008,  # forced warps: never the verdict
                     "native[steps=32,warps=0,gs=128,pdl]": 0.009}  # a dropped variant of an older file
            rows += [_row({"M": M, "K": K, "N": N}, impl, "fwd", ms) for impl, ms in times.items()]
            rows.append(_row({"M": M, "K": K, "N": N}, "native[steps=0,pdl]", "bwd", 0.020))
            rows.append(_row({"M": M, "K": K, "N": N}, "native[steps=0,prefetch=8,pdl]", "bwd", 0.018))
            rows.append(_row({"M": M, "K": K, "N": N}, "native[steps=0]", "bwd", 0.021))
    rows.append({"shape": {"M": 1, "K": 64, "N": 4224}, "impl": "fp16", "mode": "floor", "median_ms": 0.0031})
    for M in (1, 16):  # fastest everywhere but wrong: never chosen
        rows.append({**_row({"M": M, "K": 4096, "N": 4096}, "native[steps=0,ksplit=8,gs=128,pdl]", "fwd", 0.001),
                     "rel_err_vs_fp32": float("nan")})
    lines = decide_int4.report(rows)
    text = "\n".join(lines)
    assert "forward ksplit, M <= 8: steps=0,ksplit=4,pdl beats the default on every shape (worst ratio 0.750)" in text
    # ksplit=2 loses at M=16 on 4096x11008, ksplit=4 wins there by 6.25% on both shapes
    assert "forward ksplit, M > 8: steps=0,ksplit=4,pdl beats the default on every shape (worst ratio 0.938)" in text
    assert "forward steps, M <= 8: the default stays" in text  # steps=4 wins by 1.25%: within the margin
    assert "forward steps, M > 8: steps=22,pdl beats the default on every shape (worst ratio 0.875)" in text
    # prefetch=16: 6.25% faster on 4096x4096, 3.1% on 4096x11008: a win at both M brackets
    assert "forward prefetch, M <= 8: steps=0,prefetch=16,pdl beats the default on every shape (worst ratio 0.969)" in text
    assert "pdl fwd: median 0.970" in text and "pdl bwd: median 0.952" in text and "keep _pdl_enabled() on" in text
    assert "read floor 4096x4096: read[ksplit=1] 1.70 TB/s" in text
    assert "graph-node floor (34 KB weight): fp16 3.10 us" in text  # not a shape of the verdicts
    assert "64x4224" not in text
    assert "WRONG RESULTS, left out: fwd native[steps=0,ksplit=8,gs=128,pdl] M=1 4096x4096: rel err nan" in text
    assert not [ln for ln in lines if "ksplit=8" in ln and not ln.startswith("WRONG")]
    assert text.endswith("as settings (M <= 8, M > 8): MOPS_FAST_INT4_FWD_STEPS=0,22 MOPS_FAST_INT4_FWD_KSPLIT=4,4 "
                         "MOPS_FAST_INT4_FWD_PREFETCH=16,16 MOPS_FAST_INT4_BWD_PREFETCH=8,8 MOPS_FAST_INT4_PDL=1")
    assert "backward prefetch, M > 8: steps=0,prefetch=8,pdl beats the default on every shape (worst ratio 0.900)" in text
    assert decide_int4.parse_native("native[steps=-22,warps=8,ksplit=3,prefetch=8,gs=0,tiled,pdl]") == {
        "steps": -22, "warps": 8, "ksplit": 3, "prefetch": 8, "gs": 0, "tiled": True, "pdl": True}
    assert decide_int4.parse_native("native[steps=0,pdl]") == {
        "steps": 0, "warps": 0, "ksplit": 0, "prefetch": 0, "gs": 128, "tiled": False, "pdl": True}
