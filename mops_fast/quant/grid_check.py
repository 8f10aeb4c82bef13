"""Is a "dense" checkpoint already quantized? Checks whether its linear weights sit on a blockwise affine grid.

Checkpoints dequantized from GGUF Q4_0/Q4_1 (or any RTN format) keep every block of `block` inputs on
`levels` equally spaced values. Requantizing such a model to GPTQ stacks a second grid on the first; when
the first grid has a float minimum (Q4_1) the GPTQ format's integer zero point cannot reproduce it, and the
leftover per-block offset, `zero_frac` times the step, is what 4-bit GPTQ cannot remove (docs/compression.md).

  python -m mops_fast.quant.grid_check smollm2-135m [--block 32] [--levels 16]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def affine_grid_stats(weights: dict[str, torch.Tensor], block: int = 32, levels: int = 16,
                      tol: float = 1e-3) -> dict:
    """Over every 2-D weight whose in_features divide by `block`: the share of blocks whose values lie on
    `levels` equally spaced points from the block's min to its max (to `tol` of a step), and for those the
    distance of -min/step to the nearest integer (0 = an integer zero point reproduces the block exactly)."""
    if block < 2 or levels < 2:
        raise ValueError(f"block ({block}) and levels ({levels}) must be >= 2")
    on, total, fracs, skipped = 0, 0, [], []
    for name, w in weights.items():
        if w.dim() != 2 or not w.is_floating_point():
            continue
        if w.shape[1] % block:
            skipped.append(name)
            continue
        b = w.detach().double().reshape(w.shape[0], -1, block)
        lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
        step = (hi - lo) / (levels - 1)
        flat = step.squeeze(-1) == 0
        step = step.clamp_min(torch.finfo(torch.float64).tiny)
        q = (b - lo) / step
        hit = ((q - q.round()).abs().amax(-1) <= tol) & ~flat
        on += int(hit.sum())
        total += hit.numel()
        z = (-lo / step).squeeze(-1)[hit]
        fracs.append((z - z.round()).abs())
    if total == 0:
        raise ValueError(f"no 2-D float weight has in_features divisible by block={block}; nothing to check")
    f = torch.cat(fracs) if fracs else torch.zeros(0, dtype=torch.float64)
    return {
        "block": block, "levels": levels, "blocks": total, "on_grid": on, "on_grid_share": on / total,
        "zero_frac_mean": float(f.mean()) if f.numel() else None,
        "zero_frac_below_0.05": float((f < 0.05).double().mean()) if f.numel() else None,
        "skipped": skipped,
    }


def linear_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The `*proj.weight` tensors of a safetensors model directory (the linears GPTQ would quantize)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}; pass a model directory or a known model name")
    out = {}
    for fp in files:
        with safe_open(str(fp), "pt") as f:
            for n in f.keys():
                if n.endswith("proj.weight"):
                    out[n] = f.get_tensor(n)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="model directory or a known name (smollm2-135m)")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--levels", type=int, default=16)
    args = ap.parse_args(argv)
    from mops_fast.hf.loading import resolve_model_path

    stats = affine_grid_stats(linear_weights(resolve_model_path(args.model)), args.block, args.levels)
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
