"""Driver for Nsight Compute: one launch of each small-M CUDA kernel variant on 4096x11008, M=1, fp16,
group 128 (the issue's decode shape), so that `ncu` reports bandwidth, occupancy and stall reasons per
variant side by side. Run by `STEPS=ncu_int4 benchmarks/run_gpu.sh`; alone:

  ncu -k regex:int4_small_m --section SpeedOfLight --section Occupancy --section LaunchStats \\
      --section WarpStateStats python3 benchmarks/ncu_int4_small_m.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tune_int4_gpu import GROUP, make_weight  # noqa: E402

from mops_fast import native  # noqa: E402

# (steps, ksplit) hints of csrc/cuda/int4_small_m.cu (plan()): the default (pipelined at M = 1), the 4-step
# kernel, and the default with K split 2 and 4 ways over thread-block clusters (sm_90)
VARIANTS = ((0, 0), (4, 0), (0, 2), (0, 4))


def main() -> int:
    if not torch.cuda.is_available() or not native.cuda_available():
        print("ncu_int4_small_m: needs a CUDA device and mops_fast._C_cuda", file=sys.stderr)
        return 2
    K, N = 4096, 11008
    qw, qz, sc, gi = make_weight(K, N, seed=0)
    x = torch.randn(1, K, device="cuda", dtype=torch.float16)
    G = sc.shape[0]
    ref = native.int4_cuda_small_m_validated(x, qw, qz, sc, gi, K, N, G, group_size=GROUP)
    for steps, ksplit in VARIANTS:
        y = native.int4_cuda_small_m_validated(x, qw, qz, sc, gi, K, N, G, group_size=GROUP, steps=steps,
                                               ksplit=ksplit)
        torch.cuda.synchronize()
        diff = (y.float() - ref.float()).abs().max().item()
        plan = native.int4_small_m_plan(1, K, N, G, GROUP, steps=steps, ksplit=ksplit)
        print(f"steps={steps} ksplit={ksplit} {plan}: max abs diff vs default {diff:.3e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
