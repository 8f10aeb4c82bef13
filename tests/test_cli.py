"""The CLI reports config errors clearly and runs a tiny end-to-end train/eval."""
import json

import pytest

from mops_fast.cli import main
from mops_fast.train.run import load_config


def test_bad_configs(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\nmethodz: [mops]\n")
    with pytest.raises(ValueError, match="unknown keys \\['methodz'\\]"):
        load_config(p)
    p.write_text("name: x\nmethods: [mops, lora2]\n")
    with pytest.raises(ValueError, match="unknown method"):
        load_config(p)
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_config_is_valid():
    from pathlib import Path

    from mops_fast import MoPsConfig
    from mops_fast.train.trainer import TrainConfig

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    MoPsConfig.from_dict(cfg["mops"])
    TrainConfig.from_dict(cfg["train"])
    assert cfg["methods"] == ["none", "prompt", "mops"]


def test_refine_subcommand_reports_errors(tmp_path, capsys):
    """`mops-fast refine` is wired to the quant CLI: a dense directory is refused with the fix named."""
    d = tmp_path / "dense"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["refine", "--model", str(d), "--out", str(tmp_path / "o")]) == 2
    assert "is not quantized" in capsys.readouterr().err


def test_config_file_errors_name_the_file(tmp_path):
    from mops_fast.config_file import read_config_file

    with pytest.raises(FileNotFoundError, match=r"missing.yaml does not exist; see configs/x.yaml"):
        read_config_file(tmp_path / "missing.yaml", example="configs/x.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ValueError, match=r"bad.yaml is not valid YAML"):
        load_config(bad)
    js = tmp_path / "c.json"
    js.write_text("name: x\n")
    with pytest.raises(ValueError, match=r"c.json is not valid JSON .*\.yaml or \.yml name"):
        read_config_file(js)
    js.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a mapping at the top level"):
        read_config_file(js)
    js.write_text('{"name": "x"}')
    assert read_config_file(js) == {"name": "x"}


def test_ppl_table_marks_the_best_and_skips_empty_rows():
    from mops_fast.train.report import markdown_table, ppl_table_lines

    res = {"methods": {"prompt": {"ppl": {"a": 3.0, "b": 2.0, "mean": 2.5}, "lr": 0.01},
                       "mops": {"ppl": {"a": 2.0, "b": 2.5, "mean": 2.25}, "lr": 0.001}}}
    lines = ppl_table_lines(res)
    assert lines[:2] == ["| category | prompt | mops |", "| --- | ---: | ---: |"]
    assert "| a | 3.000 | **2.000** |" in lines and "| b | **2.000** | 2.500 |" in lines
    assert "| **mean** | 2.500 | **2.250** |" in lines
    assert "| learning rate | 0.01 | 0.001 |" in lines
    assert not [ln for ln in lines if "tokens/s" in ln or "gate" in ln]  # no method recorded them
    res["methods"]["mops"]["gate_effective_experts"] = 1.0
    assert "| gate: effective experts | - | 1.00 |" in ppl_table_lines(res)
    assert "mops vs prompt: mean perplexity 10.00% lower" in markdown_table(res)


def test_config_sections_must_be_mappings_of_known_keys():
    from mops_fast import MoPsConfig
    from mops_fast.federated.strategies import StrategyConfig

    with pytest.raises(ValueError, match="MoPsConfig must be a mapping of keys to values, got int 3"):
        MoPsConfig.from_dict(3)
    with pytest.raises(ValueError, match=r"strategy: unknown keys \['mu'\]; known keys are \["):
        StrategyConfig.from_dict({"name": "fedavg", "mu": 0.1})
    assert MoPsConfig.from_dict({"num_experts": 2}).num_experts == 2
