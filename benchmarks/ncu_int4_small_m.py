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

# (steps hint of csrc/cuda/int4_small_m.cu launch(), tiled qweight): the default (pipelined at M = 1), the
# streamed kernel (34: scales after the mma; 38: and x from global memory), the pipelined and streamed ones
# on tiled weights
VARIANTS = ((0, False), (32, False), (34, False), (38, False), (22, True), (32, True))


def main() -> int:
    if not torch.cuda.is_available() or not native.cuda_available():
        print("ncu_int4_small_m: needs a CUDA device and mops_fast._C_cuda", file=sys.stderr)
        return 2
    K, N = 4096, 11008
    qw, qz, sc, gi = make_weight(K, N, seed=0)
    x = torch.randn(1, K, device="cuda", dtype=torch.float16)
    ref = native.int4_cuda_small_m_validated(x, qw, qz, sc, gi, K, N, sc.shape[0], group_size=GROUP)
    qt = native.tile_qweight(qw)
    for steps, tiled in VARIANTS:
        y = native.int4_cuda_small_m_validated(x, qt if tiled else qw, qz, sc, gi, K, N, sc.shape[0],
                                               group_size=GROUP, steps=steps, tiled=tiled)
        torch.cuda.synchronize()
        diff = (y.float() - ref.float()).abs().max().item()
        print(f"steps={steps} tiled={tiled}: max abs diff vs default {diff:.3e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
