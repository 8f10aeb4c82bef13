"""The compression-quality report: table rows, sorting and the change against dense."""
import json

from mops_fast.quant.quality import RUNS, describe, main, markdown_table


def fake_result():
    cats = ["brainstorming", "closed_qa"]

    def run(name, a, b):
        return {"settings": RUNS[name], "ppl": {cats[0]: a, cats[1]: b, "mean": (a + b) / 2}}

    runs = {"dense": run("dense", 10.0, 20.0), "rtn4_g128_asym": run("rtn4_g128_asym", 14.0, 22.0),
            "gptq4_g128_asym_act": run("gptq4_g128_asym_act", 11.0, 20.0)}
    for e in runs.values():
        e["mean_ppl_vs_dense"] = e["ppl"]["mean"] / 15.0 - 1
    return {"device": "cpu test", "torch": "x", "runs": runs,
            "eval": {"records": 4, "per_category": 2, "max_length": 256}}


def test_table_sorted_by_mean_with_change_against_dense():
    t = markdown_table(fake_result())
    rows = [line for line in t.splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == ["dense", "gptq4_g128_asym_act", "rtn4_g128_asym"]
    assert "| 15.500 | +3.3% |" in rows[1] and "| 18.000 | +20.0% |" in rows[2] and "| 15.000 | - |" in rows[0]
    assert "brain = brainstorming" in t and "cq = closed_qa" in t


def test_describe_names_the_settings():
    assert describe(RUNS["gptq4_g128_asym_act"]) == "GPTQ, 4-bit g128 asym, act-order"
    assert describe(RUNS["sparsegpt50_gptq4"]).startswith("Sparsegpt, 50% unstructured, then GPTQ, 4-bit g128")
    assert describe(None).startswith("dense")
    assert describe(RUNS["gptq4_g32_asym_act_distill"]) == ("GPTQ, 4-bit g32 asym, act-order, scales distilled "
                                                           "(200 steps)")
    for spec in RUNS.values():  # a refined run names a base run that exists
        if isinstance(spec, dict) and "refine_of" in spec:
            assert spec["refine_of"] in RUNS


def test_table_flag_prints_from_json(tmp_path, capsys):
    out = tmp_path / "q.json"
    out.write_text(json.dumps(fake_result()))
    assert main(["--table", "--out", str(out)]) == 0
    assert "`rtn4_g128_asym`" in capsys.readouterr().out
