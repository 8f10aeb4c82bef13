"""Every config shipped in configs/ passes its runner's own checks, so a key renamed in the code cannot leave
a config that fails only when a long run reaches it."""
from pathlib import Path

import pytest

from mops_fast import experiments as ex
from mops_fast.config_file import read_config_file
from mops_fast.federated.config import validate_config
from mops_fast.train.run import check_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_is_valid(path):
    cfg = read_config_file(path)
    if "settings" in cfg:  # an experiment grid: every cell, full and quick
        for quick in (False, ("quick" in cfg)):
            for cell in ex.expand(ex.load_grid(path, quick=quick)):
                ex.check_cell_config(cell)
    elif "federated" in cfg:
        validate_config(cfg)
    else:
        check_config(cfg, path.name)


def test_check_config_names_bad_train_and_mops_settings():
    with pytest.raises(ValueError, match="lr must be > 0"):
        check_config({"methods": ["mops"], "train": {"lr": 0}})
    with pytest.raises(ValueError, match="steps must be >= 1"):
        check_config({"train": {"steps": 5}, "method_overrides": {"prompt": {"steps": 0}}})
    with pytest.raises(ValueError, match="method_overrides.gpt"):
        check_config({"method_overrides": {"gpt": {"lr": 1e-3}}})
    with pytest.raises(ValueError, match="TrainConfig"):
        check_config({"train": {"learning_rate": 1e-3}})
    with pytest.raises(ValueError, match="num_experts"):
        check_config({"mops": {"num_experts": 0}})


def test_federated_configs_name_bad_method_overrides():
    data = {"train": "a.jsonl", "test": "b.jsonl"}
    with pytest.raises(ValueError, match="method_overrides.gpt must name a method"):
        validate_config({"data": data, "method_overrides": {"gpt": {}}})
    with pytest.raises(ValueError, match="method_overrides.mops must name a method and hold train keys"):
        validate_config({"data": data, "method_overrides": {"mops": 3}})
    with pytest.raises(ValueError, match="set by the federated schedule"):
        validate_config({"data": data, "method_overrides": {"mops": {"steps": 2}}})
