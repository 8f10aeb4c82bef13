"""Reading a config file (YAML or JSON) into a mapping, with errors that name the file and the fix.

One reader for every config the CLI takes (train, federate, experiment grids); each validates the keys
of its own kind afterwards.
"""
from __future__ import annotations

import json
from pathlib import Path


def read_config_file(path, example: str | None = None) -> dict:
    """The top-level mapping of a .yaml/.yml (YAML) or any other (JSON) config file. `example` names a
    config to copy from, said when the file is missing."""
    p = Path(path)
    if not p.is_file():
        hint = f"; see {example} for an example" if example else ""
        raise FileNotFoundError(f"config {p} does not exist{hint}")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            cfg = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"config {p} is not valid YAML: {e}") from None
    else:
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config {p} is not valid JSON ({e}); YAML configs need a .yaml or .yml name") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"config {p} must be a mapping at the top level")
    return cfg
