"""The experiment grid: expansion, merging, resumability, backbone caching, failures, the results report."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from mops_fast import experiments as ex
from mops_fast.train.report import history_curve

CATS = ["closed_qa", "open_qa"]


def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(obj))
    return path


@pytest.fixture
def grid_file(tmp_path):
    central = _write(tmp_path / "central.yaml", {
        "name": "c", "model": "smollm2-135m", "data": {"train": "t.jsonl", "test": "s.jsonl", "test_per_category": 20},
        "lr_search": {"candidates": [1e-3], "steps": 5, "heldout_per_category": 1},
        "train": {"steps": 100, "batch_size": 4}, "mops": {"num_experts": 8, "prompt_len": 8}})
    fed = _write(tmp_path / "fed.yaml", {
        "name": "f", "model": "smollm2-135m", "data": {"train": "t.jsonl", "test": "s.jsonl"},
        "train": {"batch_size": 4}, "federated": {"rounds": 10, "partition": {"num_clients": 4}}})
    grid = {
        "name": "g", "out_dir": str(tmp_path / "runs"), "backbone_dir": str(tmp_path / "backbones"),
        "report": str(tmp_path / "docs" / "results.md"), "report_images": str(tmp_path / "docs" / "img"),
        "settings": {
            "centralized": {"runner": "centralized", "base": str(central),
                            "overrides": {"train": {"steps": 60}}, "quick": {"train": {"steps": 2}, "lr_search": None}},
            "fed": {"runner": "federated", "base": str(fed), "overrides": {"federated": {"rounds": 6}},
                    "quick": {"federated": {"rounds": 1}}},
        },
        "compressions": {"dense": None, "gptq4": {"method": "gptq", "bits": 4}},
        "compress_defaults": {"calib_samples": 128},
        "quick": {"out_dir": str(tmp_path / "runs_quick"), "compress_defaults": {"calib_samples": 8}},
    }
    return _write(tmp_path / "grid.yaml", grid)


def fake_results(cell: ex.Cell, ppl: dict[str, float], methods=None) -> dict:
    methods = methods or cell.methods
    res = {"model": cell.config["model"], "data": "dolly15k", "setting": cell.runner, "compression": cell.compression,
           "steps": 2, "seed": 0, "eval": {"test_records": 4}, "methods": {}}
    for m in methods:
        per = {c: ppl[m] + i for i, c in enumerate(CATS)}
        per["mean"] = sum(per.values()) / len(per)
        entry = {"ppl": per, "train_tokens_per_s": None if m == "none" else 100.0, "lr": None if m == "none" else 3e-3}
        if cell.runner == "federated" and m != "none":
            entry["history"] = [{"stage": "eval", "round": r, "ppl": {"mean": ppl[m] + 3 - r}} for r in (1, 2)]
            entry["history"].append({"stage": "eval", "round": 2, "final": True, "ppl": per})
        res["methods"][m] = entry
    return res


class StubRunner:
    def __init__(self, fail: set[str] = frozenset()):
        self.calls, self.fail = [], set(fail)

    def __call__(self, cell, log):
        self.calls.append(cell.name)
        if cell.name in self.fail:
            raise RuntimeError("boom")
        cell.out.mkdir(parents=True, exist_ok=True)
        (cell.out / "results.json").write_text(json.dumps(fake_results(cell, {"none": 20.0, "prompt": 18.0, "mops": 16.2})))


class StubCompress:
    def __init__(self):
        self.calls = []

    def __call__(self, model, opts, out, log):
        self.calls.append((model, dict(opts), Path(out)))
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "config.json").write_text("{}")
        return out


def test_expand_cells_names_and_merged_configs(grid_file, tmp_path):
    g = ex.load_grid(grid_file)
    cells = ex.expand(g)
    assert [c.name for c in cells] == ["centralized-dense", "centralized-gptq4", "fed-dense", "fed-gptq4"]
    c = cells[1]
    assert c.runner == "centralized" and c.compression == "gptq4" and c.compress == {"method": "gptq", "bits": 4}
    assert c.config["train"] == {"steps": 60, "batch_size": 4}  # override merged, other keys kept
    assert c.config["name"] == "centralized-gptq4" and c.config["compression"] == "gptq4"
    assert c.out == tmp_path / "runs" / "centralized-gptq4"
    assert c.config["lr_search"]["candidates"] == [1e-3]
    assert cells[2].config["federated"]["rounds"] == 6 and cells[2].runner == "federated"
    assert c.methods == ["none", "prompt", "mops"]


def test_quick_mode_merges_quick_blocks_and_null_deletes(grid_file, tmp_path):
    g = ex.load_grid(grid_file, quick=True)
    cells = ex.expand(g)
    assert cells[0].config["train"]["steps"] == 2
    assert "lr_search" not in cells[0].config  # `null` deletes the key
    assert cells[2].config["federated"]["rounds"] == 1
    assert cells[0].out.parent == tmp_path / "runs_quick"
    assert g["compress_defaults"] == {"calib_samples": 8}


def test_merge_semantics():
    base = {"a": {"x": 1, "y": 2}, "b": [1, 2], "c": 3}
    out = ex.merge(base, {"a": {"y": 5, "z": 6}, "b": [9], "c": None})
    assert out == {"a": {"x": 1, "y": 5, "z": 6}, "b": [9]}
    assert base == {"a": {"x": 1, "y": 2}, "b": [1, 2], "c": 3}  # not modified


def test_variants_and_duplicate_names(tmp_path, grid_file):
    g = yaml.safe_load(grid_file.read_text())
    g["variants"] = {"default": {}, "mix": {"methods": ["mops"], "mops": {"mode": "mix"}}}
    g["compressions"] = {"dense": None}
    cells = ex.expand(ex.load_grid(_write(tmp_path / "v.yaml", g)))
    names = [c.name for c in cells]
    assert names == ["centralized-dense-default", "centralized-dense-mix", "fed-dense-default", "fed-dense-mix"]
    mix = cells[1]
    assert mix.methods == ["mops"] and mix.config["mops"]["mode"] == "mix" and mix.config["mops"]["num_experts"] == 8


@pytest.mark.parametrize("patch, msg", [
    ({"bogus": 1}, "unknown keys"),
    ({"settings": {"centralized": {"runner": "x", "base": "b"}}}, "runner must be one of"),
    ({"settings": {"centralized": {"runner": "centralized"}}}, "base"),
    ({"compressions": {"q": {"bits": 4}}}, "needs a `method`"),
])
def test_load_grid_errors(tmp_path, grid_file, patch, msg):
    g = yaml.safe_load(grid_file.read_text())
    g.update(patch)
    with pytest.raises(ValueError, match=msg):
        ex.load_grid(_write(tmp_path / "bad.yaml", g))


def test_quick_needs_quick_block(tmp_path, grid_file):
    g = yaml.safe_load(grid_file.read_text())
    del g["quick"]
    with pytest.raises(ValueError, match="quick"):
        ex.load_grid(_write(tmp_path / "noquick.yaml", g), quick=True)


def test_check_cell_config_names_the_cell(grid_file):
    cells = ex.expand(ex.load_grid(grid_file))
    cells[0].config["bogus"] = 1
    with pytest.raises(ValueError, match="cell centralized-dense: unknown keys"):
        ex.check_cell_config(cells[0])
    cells[2].config["train"]["steps"] = 5  # set by the federated schedule: the federated validator refuses it
    with pytest.raises(ValueError, match="cell fed-dense"):
        ex.check_cell_config(cells[2])


def test_run_grid_resumes_and_caches_backbones(grid_file, tmp_path):
    g = ex.load_grid(grid_file)
    runner, comp = StubRunner(), StubCompress()
    cells = ex.expand(g)
    # one cell finished earlier; another has a results.json lacking a method (unfinished)
    StubRunner()(cells[0], print)
    partial = cells[2]
    partial.out.mkdir(parents=True)
    (partial.out / "results.json").write_text(json.dumps(fake_results(partial, {"none": 1.0}, methods=["none"])))
    st = ex.run_grid(g, cell_runner=runner, compress_fn=comp, log=lambda *_: None)
    assert runner.calls == ["centralized-gptq4", "fed-dense", "fed-gptq4"]
    assert all(v["state"] == "done" for v in st.values()) and len(st) == 4
    # the gptq4 backbone was made once, with the grid's compress defaults, and both gptq4 cells used it
    assert len(comp.calls) == 1
    model, opts, out = comp.calls[0]
    assert model == "smollm2-135m" and opts == {"calib_samples": 128, "method": "gptq", "bits": 4}
    assert out.name.endswith(".partial")
    bb = out.with_name(out.name[: -len(".partial")])
    assert (bb / "config.json").is_file() and not out.exists()
    res = json.loads((tmp_path / "runs" / "fed-gptq4" / "results.json").read_text())
    assert res["model"] == str(bb)
    # everything finished: a second run calls nothing
    runner2, comp2 = StubRunner(), StubCompress()
    ex.run_grid(g, cell_runner=runner2, compress_fn=comp2, log=lambda *_: None)
    assert runner2.calls == [] and comp2.calls == []


def test_reuse_takes_an_identical_finished_cell_and_refuses_a_different_one(grid_file, tmp_path):
    src = ex.load_grid(grid_file)
    central = yaml.safe_load(grid_file.read_text())["settings"]["centralized"]
    abl = {"name": "abl", "out_dir": str(tmp_path / "abl_runs"), "report": str(tmp_path / "abl.md"),
           "settings": {"centralized": central}, "compressions": {"dense": None},
           "variants": {"default": {}, "J1": {"methods": ["mops"], "mops": {"num_experts": 1, "prompt_len": 64}}},
           "reuse": {"centralized-dense-default": {"grid": str(grid_file), "cell": "centralized-dense"}}}
    g = ex.load_grid(_write(tmp_path / "abl.yaml", abl))
    runner = StubRunner()
    ex.run_grid(g, cell_runner=runner, log=lambda *_: None)  # the source has not run: both cells run
    assert sorted(runner.calls) == ["centralized-dense-J1", "centralized-dense-default"]
    for c in ex.expand(g):
        (c.out / "results.json").unlink()
    StubRunner()(ex.expand(src)[0], print)  # now the source cell is finished
    runner = StubRunner()
    st = ex.run_grid(g, cell_runner=runner, log=lambda *_: None)
    assert runner.calls == ["centralized-dense-J1"]
    assert st["centralized-dense-default"]["reused_from"].endswith("grid.yaml:centralized-dense")
    copied = tmp_path / "abl_runs" / "centralized-dense-default" / "results.json"
    assert copied.read_text() == (tmp_path / "runs" / "centralized-dense" / "results.json").read_text()
    grids, rep, img = ex.report_targets(tmp_path / "abl.yaml")
    text = ex.write_report(grids, rep, img).read_text()
    assert "same run as `" in text
    # the mops-only variant is compared with the default's prompt, and says so
    assert "| - | - | 16.700 | +9.73% * |" in text
    assert "against the prompt of the same setting and backbone in cell `centralized-dense-default`" in text
    # a reuse entry whose runs differ is refused before anything runs
    abl["settings"]["centralized"] = {**central, "overrides": {"train": {"steps": 61}}}
    g2 = ex.load_grid(_write(tmp_path / "abl2.yaml", {**abl, "out_dir": str(tmp_path / "abl2_runs")}))
    runner = StubRunner()
    with pytest.raises(ValueError, match=r"runs differ in \['config.train.steps'\]"):
        ex.run_grid(g2, cell_runner=runner, log=lambda *_: None)
    assert runner.calls == []
    with pytest.raises(ValueError, match="does not have"):
        ex.reuse_source({**g, "reuse": {"centralized-dense-default": {"grid": str(grid_file), "cell": "nope"}}},
                        next(c for c in ex.expand(g) if c.variant == "default"))


def test_run_grid_records_failures_and_keeps_going(grid_file, tmp_path):
    g = ex.load_grid(grid_file)
    runner = StubRunner(fail={"centralized-dense"})
    st = ex.run_grid(g, cell_runner=runner, compress_fn=StubCompress(), log=lambda *_: None)
    assert st["centralized-dense"]["state"] == "failed" and "boom" in st["centralized-dense"]["error"]
    assert st["fed-dense"]["state"] == "done"
    status = json.loads((tmp_path / "runs" / "grid_status.json").read_text())
    assert status["cells"]["centralized-dense"]["state"] == "failed"
    with pytest.raises(RuntimeError, match="boom"):
        ex.run_grid(g, cell_runner=StubRunner(fail={"centralized-dense"}), compress_fn=StubCompress(),
                    log=lambda *_: None, keep_going=False)


def test_run_grid_only_and_stale_partial_backbone(grid_file, tmp_path):
    g = ex.load_grid(grid_file)
    cell = [c for c in ex.expand(g) if c.name == "fed-gptq4"][0]
    key = ex.backbone_key("smollm2-135m", "gptq4", ex.compress_options(g, cell.compress))
    stale = tmp_path / "backbones" / (key + ".partial")
    stale.mkdir(parents=True)
    (stale / "junk").write_text("x")
    runner = StubRunner()
    ex.run_grid(g, only=["fed-*"], cell_runner=runner, compress_fn=StubCompress(), log=lambda *_: None)
    assert runner.calls == ["fed-dense", "fed-gptq4"]
    assert not stale.exists() and (tmp_path / "backbones" / key / "config.json").is_file()
    with pytest.raises(ValueError, match="matches no cell"):
        ex.run_grid(g, only=["nope*"], cell_runner=runner, log=lambda *_: None)


def test_backbone_key_depends_on_settings():
    a = ex.backbone_key("smollm2-135m", "gptq4", {"method": "gptq", "calib_samples": 128})
    b = ex.backbone_key("smollm2-135m", "gptq4", {"method": "gptq", "calib_samples": 8})
    assert a != b and a.startswith("smollm2-135m-gptq4-")


def test_default_compress_rejects_unknown_options(tmp_path):
    with pytest.raises(ValueError, match="not options of `mops-fast compress`"):
        ex.default_compress("smollm2-135m", {"method": "gptq", "bogus_option": 1}, tmp_path / "x")


def test_report_tables_reductions_plots_and_missing(grid_file, tmp_path):
    g = ex.load_grid(grid_file)
    cells = ex.expand(g)
    for c, ppl in zip(cells[:3], ({"none": 20.0, "prompt": 18.0, "mops": 16.2},
                                  {"none": 30.0, "prompt": 25.0, "mops": 26.0},
                                  {"none": 22.0, "prompt": 20.0, "mops": 15.0})):
        c.out.mkdir(parents=True)
        (c.out / "results.json").write_text(json.dumps(fake_results(c, ppl)))
    ex._write_status(ex._status_path(g), {"cells": {"fed-gptq4": {"state": "failed", "error": "RuntimeError: no GPU"}}})
    grids, rep, img = ex.report_targets(grid_file)
    assert [x["_mode"] for x in grids] == ["full"]  # the quick folder has no results: not reported
    path = ex.write_report(grids, rep, img)
    text = path.read_text()
    # summary row: means are (p + p+1)/2; reduction 1 - 16.7/18.5 = 9.73%
    assert "| centralized-dense | centralized | dense | 20.500 | 18.500 | 16.700 | +9.73% |" in text
    assert "| centralized-gptq4 | centralized | gptq4 | 30.500 | 25.500 | 26.500 | -3.92% |" in text
    assert "HIGHER (mops does not win here)" in text
    assert "mops has the lower mean perplexity than prompt in 2 of 3 cells." in text
    assert "Measured on" not in text  # these results record no machine: nothing is claimed
    # per-category table of a cell, best value in bold
    assert "| closed_qa | 20.000 | 18.000 | **16.200** |" in text
    assert "`fed-gptq4`: failed: RuntimeError: no GPU" in text
    assert (img / "g-full-centralized-dense-ppl.png").is_file()
    assert (img / "g-full-fed-dense-rounds.png").is_file()  # federated: curve per round
    assert "![g-full-fed-dense-rounds](img/g-full-fed-dense-rounds.png)" in text
    # rewritten where fewer runs exist (a fresh clone), the report would lose measured tables: refused
    (cells[0].out / "results.json").unlink()
    with pytest.raises(ValueError, match="shows 3 cells with results but only 2 have a results.json"):
        ex.write_report(grids, rep, img)
    assert path.read_text() == text
    path.unlink()
    assert "2 of 4 cells have results" in ex.write_report(grids, rep, img).read_text()


def test_report_compares_mops_with_lora_borrowed_from_its_setting(grid_file, tmp_path):
    # a variant that trains the LoRA reference alone: the other cells' mops are compared with it
    g = yaml.safe_load(grid_file.read_text())
    g["settings"].pop("fed")
    g["compressions"] = {"dense": None}
    g["variants"] = {"default": {"methods": ["prompt", "mops"]}, "lora": {"methods": ["lora"]}}
    gf = _write(tmp_path / "grid_lora.yaml", g)
    cells = ex.expand(ex.load_grid(gf))
    for c, ppl in zip(cells, ({"prompt": 18.0, "mops": 16.2}, {"lora": 19.5})):
        c.out.mkdir(parents=True)
        (c.out / "results.json").write_text(json.dumps(fake_results(c, ppl)))
    grids, rep, img = ex.report_targets(gf)
    text = ex.write_report(grids, rep, img).read_text()
    assert "| none | prompt | mops | lora | reduction, mops vs prompt | reduction, mops vs lora | wall |" in text
    # 1 - 16.7 / 18.5 = 9.73%; against the lora cell's 20.0: 1 - 16.7 / 20.0 = 16.50%
    assert "| centralized-dense-default | centralized | dense | default | - | 18.500 | 16.700 | - | +9.73% | +16.50% * |" in text
    assert "| centralized-dense-lora | centralized | dense | lora | - | - | - | 20.000 | - | - |" in text
    assert "of the same setting and backbone in cell `centralized-dense-lora`" in text
    assert "mops vs lora (LoRA, the outside reference)" not in text  # no cell trained both


def test_category_table_shows_each_learning_rate_search():
    res = {"methods": {"none": {"ppl": {"a": 20.0, "mean": 20.0}},
                       "prompt": {"ppl": {"a": 14.0, "mean": 14.0}, "lr": 0.1, "lr_search": {"0.01": 15.5, "0.1": 13.25}},
                       "mops": {"ppl": {"a": 13.0, "mean": 13.0}, "lr": 0.01}}}
    lines = ex.category_table(res).splitlines()
    assert "| learning rate | - | 0.1 | 0.01 |" in lines
    assert "| lr search (held-out ppl) | - | 0.01: 15.500, **0.1: 13.250** | - |" in lines
    del res["methods"]["prompt"]["lr_search"]
    assert not any("lr search" in x for x in ex.category_table(res).splitlines())


def test_round_curves_skip_final_eval():
    res = {"setting": "federated",
           "methods": {"mops": {"history": [{"stage": "B"}, {"stage": "eval", "round": 2, "ppl": {"mean": 3.0}},
                                            {"stage": "eval", "round": 1, "ppl": {"mean": 4.0}},
                                            {"stage": "eval", "round": 2, "final": True, "ppl": {"mean": 9.0}}]},
                       "none": {"ppl": {"mean": 1.0}}}}
    assert ex.curves(res) == ("round", {"mops": [(1, 4.0), (2, 3.0)]})
    # where the round subset is the test set, the final entry is that round's only point
    only_final = [{"stage": "eval", "round": 2, "final": True, "ppl": {"mean": 9.0}},
                  {"stage": "eval", "round": 1, "ppl": {"mean": 4.0}}]
    assert history_curve(only_final, "round") == [(1, 4.0), (2, 9.0)]


def test_step_curves_table_and_plot(tmp_path):
    hist = lambda pts: [{"stage": "B", "step": 5, "loss": 2.0}] + [
        {"stage": "eval", "step": s, "ppl": {"mean": v}} for s, v in pts]
    res = {"setting": "centralized", "methods": {
        "prompt": {"ppl": {"a": 5.0, "mean": 5.0}, "history": hist([(20, 7.0), (10, 9.0), (30, 5.0)])},
        "mops": {"ppl": {"a": 4.0, "mean": 4.0}, "history": hist([(10, 8.0), (30, 4.0)])},
        "none": {"ppl": {"a": 6.0, "mean": 6.0}}}}
    assert ex.curves(res) == ("step", {"prompt": [(10, 9.0), (20, 7.0), (30, 5.0)], "mops": [(10, 8.0), (30, 4.0)]})
    lines = ex.curve_table(res)
    assert lines[2:4] == ["| step | prompt | mops |", "| ---: | ---: | ---: |"]
    assert lines[4:7] == ["| 10 | 9.000 | 8.000 |", "| 20 | 7.000 | - |", "| 30 | 5.000 | 4.000 |"]
    assert ex.curve_table({"setting": "centralized", "methods": {"none": {"ppl": {"mean": 1.0}}}}) == []
    names = [p.name for p in ex._plots(res, tmp_path, "cell")]
    assert names == ["cell-ppl.png", "cell-steps.png"]


def test_shipped_grid_configs_expand():
    root = Path(__file__).resolve().parents[1]
    for name, n in (("paper_grid.yaml", 8), ("ablations.yaml", 8), ("stage_a_seeds.yaml", 21),
                    ("federated_lora_seeds.yaml", 4), ("federated_searched_lr.yaml", 3)):
        for quick in (False, True):
            cells = ex.expand(ex.load_grid(root / "configs" / name, quick=quick))
            assert len(cells) == n
            for c in cells:
                ex.check_cell_config(c)
    full = ex.expand(ex.load_grid(root / "configs" / "paper_grid.yaml"))
    assert {c.compression for c in full} == {"dense", "gptq4", "sparsegpt50", "sparsegpt50_gptq4"}
    assert {c.runner for c in full} == {"centralized", "federated"}
    fed = [c for c in full if c.runner == "federated"][0]
    assert fed.config["federated"]["partition"]["alpha"] == 0.1
    seeds = {c.name: c.config for c in ex.expand(ex.load_grid(root / "configs" / "stage_a_seeds.yaml"))}
    assert [seeds[f"seed{s}-dense-default"]["seed"] for s in range(3)] == [0, 1, 2]
    assert seeds["seed2-dense-stage_a_off"]["train"]["gate_pretrain_steps"] == 0
    assert seeds["seed2-dense-default"]["train"]["gate_pretrain_steps"] == 200
    assert seeds["seed1-dense-stage_a_smooth"]["train"]["gate_pretrain_smoothing"] == 0.3
    # the searched-rate federated runs must share their partitions with the LoRA reference runs they are read
    # against: same seed, partition and held-out records
    lora = {c.setting: c.config for c in ex.expand(ex.load_grid(root / "configs" / "federated_lora_seeds.yaml"))}
    srch = {c.setting: c.config for c in ex.expand(ex.load_grid(root / "configs" / "federated_searched_lr.yaml"))}
    for s, ref in (("seed0", "seed0"), ("seed1", "seed1"), ("seed0_mops_lr3e2", "seed0")):
        assert srch[s]["seed"] == lora[ref]["seed"] and srch[s]["federated"] == lora[ref]["federated"]
        assert (srch[s].get("lr_search") or {}).get("heldout_per_category") == \
            (lora[ref].get("lr_search") or {}).get("heldout_per_category")
    assert srch["seed0"]["lr_search"]["methods"] == ["prompt", "mops"]


def test_real_runners_on_a_tiny_llama(tmp_path):
    """Both real runners end to end on a 2-layer random Llama: cells run, resume, and report."""
    from mops_fast.federated.backbone import tiny_llama

    model, tok = tiny_llama("tiny-llama")
    mdir = tmp_path / "tiny"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    recs = [{"instruction": f"question {i} about {c}?", "context": "", "response": f"answer {i}", "category": c}
            for c in CATS for i in range(12)]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    data = {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl"), "test_per_category": 2}
    common = {"dtype": "float32", "seed": 0, "data": data, "mops": {"num_experts": 2, "prompt_len": 2, "gate_hidden": 8},
              "init": {"kv_samples": 2}, "eval": {"batch_size": 4}}
    central = _write(tmp_path / "c.yaml", {**common, "model": str(mdir), "train": {
        "steps": 2, "batch_size": 2, "max_length": 64, "warmup_steps": 0, "gate_pretrain_steps": 2,
        "gate_pretrain_samples": 4, "log_every": 1, "progress": False}})
    fed = _write(tmp_path / "f.yaml", {**common, "model": "tiny-llama",
                                       "data": {**data, "round_test_per_category": 1},
                                       "train": {"batch_size": 2, "max_length": 64, "lr": 3.0e-3},
                                       "federated": {"rounds": 1, "clients_per_round": 2, "local_steps": 1,
                                                     "gate_rounds": 1, "gate_local_steps": 2, "gate_samples": 2,
                                                     "eval_every": 1, "partition": {"num_clients": 2, "min_examples": 2}}})
    grid = _write(tmp_path / "grid.yaml", {
        "name": "tiny", "out_dir": str(tmp_path / "runs"), "report": str(tmp_path / "results.md"),
        "report_images": str(tmp_path / "img"),
        "settings": {"centralized": {"runner": "centralized", "base": str(central)},
                     "federated": {"runner": "federated", "base": str(fed)}},
        "compressions": {"dense": None}})
    g = ex.load_grid(grid)
    st = ex.run_grid(g, log=lambda *_: None)
    assert {k: v["state"] for k, v in st.items()} == {"centralized-dense": "done", "federated-dense": "done"}
    for name, setting in (("centralized-dense", "centralized"), ("federated-dense", "federated")):
        res = json.loads((tmp_path / "runs" / name / "results.json").read_text())
        assert res["setting"] == setting and set(res["methods"]) == {"none", "prompt", "mops"}
        assert res["compression"] == "dense"
    before = (tmp_path / "runs" / "centralized-dense" / "results.json").stat().st_mtime_ns
    ex.run_grid(g, log=lambda *_: None)  # finished: nothing is recomputed
    assert (tmp_path / "runs" / "centralized-dense" / "results.json").stat().st_mtime_ns == before
    grids, rep, img = ex.report_targets(grid)
    text = ex.write_report(grids, rep, img).read_text()
    res = json.loads((tmp_path / "runs" / "centralized-dense" / "results.json").read_text())
    assert f"| {res['methods']['mops']['ppl']['mean']:.3f} |" in text
    assert "2 of 2 cells have results" in text
    # each runner records where it ran; the report names it and the cells' wall time
    assert re.search(r"\(\d+ threads?\)$", res["machine"]["device"]) and res["machine"]["torch"] == torch.__version__
    assert f"Measured on: {res['machine']['device']}, torch {torch.__version__}." in text
    assert "Wall time of these cells:" in text and " min |" in text


def test_cell_locked_by_a_live_process_is_skipped_and_stale_lock_taken_over(grid_file, tmp_path):
    import os
    import subprocess
    import sys

    g = ex.load_grid(grid_file)
    cells = ex.expand(g)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cells[0].out.mkdir(parents=True)
        (cells[0].out / ".lock").write_text(str(live.pid))
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        cells[2].out.mkdir(parents=True)
        (cells[2].out / ".lock").write_text(str(dead.pid))
        runner = StubRunner()
        ex.run_grid(g, only=["*-dense"], cell_runner=runner, log=lambda *_: None)
        assert runner.calls == ["fed-dense"]  # centralized-dense belongs to the live process
        assert not (cells[2].out / ".lock").exists() and (cells[0].out / ".lock").read_text() == str(live.pid)
    finally:
        live.kill()
        live.wait()
    assert os.path.isfile(cells[2].out / "results.json")


def test_mops_only_rows_borrow_the_prompt_trained_beside_a_mops_of_their_rate(grid_file, tmp_path):
    # two cells train prompt (a low and a high rate); a mops-only variant is compared with the prompt of the
    # cell whose mops ran at its own rate, not with whichever cell comes last
    g = yaml.safe_load(grid_file.read_text())
    g["settings"].pop("fed")
    g["compressions"] = {"dense": None}
    g["variants"] = {"low": {"methods": ["prompt", "mops"]}, "low_off": {"methods": ["mops"]},
                     "high": {"methods": ["prompt", "mops"]}, "high_off": {"methods": ["mops"]}}
    gf = _write(tmp_path / "grid_rates.yaml", g)
    cells = {c.variant: c for c in ex.expand(ex.load_grid(gf))}
    for v, ppl, lr in (("low", {"prompt": 18.0, "mops": 17.0}, 1e-2), ("low_off", {"mops": 16.0}, 1e-2),
                       ("high", {"prompt": 15.0, "mops": 15.0}, 3e-1), ("high_off", {"mops": 14.0}, 3e-1)):
        res = fake_results(cells[v], ppl)
        for m in res["methods"].values():
            m["lr"] = lr
        cells[v].out.mkdir(parents=True)
        (cells[v].out / "results.json").write_text(json.dumps(res))
    grids, rep, img = ex.report_targets(gf)
    text = ex.write_report(grids, rep, img).read_text()
    # low_off: 1 - 16.5 / 18.5 = 10.81% (the low cell's prompt); high_off: 1 - 14.5 / 15.5 = 6.45%
    assert "| centralized-dense-low_off | centralized | dense | low_off | - | - | 16.500 | +10.81% * |" in text
    assert "| centralized-dense-high_off | centralized | dense | high_off | - | - | 14.500 | +6.45% * |" in text
