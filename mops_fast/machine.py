"""Names of the machine a measurement ran on, for results and benchmark files."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: str = "cpu") -> str:
    """The GPU's name, or `<cpu model> (<torch threads> threads)`."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    n = torch.get_num_threads()
    return f"{cpu_name()} ({n} thread{'' if n == 1 else 's'})"


def machine_record(device: str = "cpu") -> dict:
    """What a results file keeps about where it was measured."""
    return {"device": device_name(device), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version()}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def device_slug(device: str = "cpu") -> str:
    """File-name form: the GPU name, or cpu-<model>-<threads>t."""
    if str(device).startswith("cuda"):
        return slug(torch.cuda.get_device_name())
    name = re.sub(r"\((r|tm)\)|cpu|processor|@.*$|\d+-core", " ", cpu_name(), flags=re.IGNORECASE)
    return f"cpu-{slug(name) or 'cpu'}-{torch.get_num_threads()}t"
