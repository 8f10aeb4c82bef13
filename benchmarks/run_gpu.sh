#!/usr/bin/env bash
# One prepared GPU session: build the CUDA extension in place, run the GPU tests, then every GPU
# benchmark, leaving JSON and logs under $OUT (default: benchmarks/results). Runs on the device image as
# it is (its own torch, triton, transformers; no internet), with the repository on PYTHONPATH.
# Budget: under 9.5 minutes on one H100 (each step has its own time limit; the GPU tests took
# 100 s and each benchmark 20-75 s on an H100 80GB HBM3, 2026-11-26).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="$OUT/run_gpu.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$log"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$log"

step() { local name=$1 limit=$2; shift 2; echo "== $name (limit ${limit}s)" | tee -a "$log";
         timeout "$limit" "$@" 2>&1 | tee -a "$log"; echo "== $name rc=${PIPESTATUS[0]}" | tee -a "$log"; }

# 1. the CUDA extension, built in place (no-op when csrc has no CUDA part yet)
step build 100 env MOPS_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0" python3 setup.py build_ext --inplace
# 2. GPU tests
step gpu_tests 180 python3 -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" \
  tests/test_gated_prefix_attention_gpu.py tests/test_int4_matmul_gpu.py tests/test_native_cuda_gpu.py \
  tests/test_attach_gpu.py tests/test_quant_refine.py
# 3. benchmarks: each writes <benchmark>-<device slug>.json into $OUT
# (at most 8 files come back from a lent machine: the log, the junit XML and one JSON per benchmark)
for b in bench_gated_prefix_attention bench_gptq_matmul bench_int4_cuda_small_m bench_e2e_gpu; do
  [ -f "benchmarks/$b.py" ] && step "$b" 70 python3 "benchmarks/$b.py" --out "$OUT"
done
echo "done" | tee -a "$log"
