"""Reading a config file (YAML or JSON) into a mapping, with errors that name the file and the fix.

One reader for every config the CLI takes (train, federate, experiment grids); each validates the keys
of its own kind afterwards.
"""
from __future__ import annotations

import dataclasses
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


def check_keys(d, known, where: str) -> None:
    """`d` is a mapping whose keys are all in `known`; else a ValueError that names `where`, the stray keys
    and the known ones."""
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping of keys to values, got {type(d).__name__} {d!r}")
    unknown = set(d) - set(known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known keys are {sorted(known)}")


def dataclass_from_dict(cls, d, where: str):
    """cls(**d) for a dataclass, after check_keys against its fields."""
    check_keys(d, {f.name for f in dataclasses.fields(cls)}, where)
    return cls(**d)
