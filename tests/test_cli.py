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
