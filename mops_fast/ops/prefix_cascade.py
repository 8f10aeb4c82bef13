"""Shared-prefix cascade for gated-prefix attention on CUDA: FlashAttention for the own keys, the
Triton kernels for the prompts, merged through the softmax state.

The J*L prompt tokens are a prefix shared by the batch, so the attention splits into two passes over
disjoint key sets (as cascade inference does for shared prefixes):
  forward   (o_s, lse_s) = FlashAttention over the sample's own keys (torch's aten flash op, causal);
            the Triton forward kernel then streams only the prompt tiles (gate bias, top-k skipping)
            starting from that state (acc = o_s, m = lse_s), and writes o and the total lse.
  backward  FlashAttention's backward, given the *total* o and lse, yields exactly the own keys' share
            of dq and their dk, dv (P = exp(s - lse_total), Delta = rowsum(do * o_total)); the Triton
            backward with no own keys adds the prompts' share of dq in place and forms d prompt_k,
            d prompt_v and d logw.
The own keys, which are most of the work at training lengths, thus run at FlashAttention's speed, and
the prompts add passes over q, do and o. Eligible: fp16 / bf16 on a CUDA device of compute capability
8.0 or more, no key-padding mask (after the right-padding rule below), Sq == Sk when causal (the
contract's bottom-right diagonal is then the usual one), head dim a multiple of 8 up to 256,
deterministic algorithms off (FlashAttention's dq uses atomics). Everything else, and any backward with
a gradient on lse, takes the single fused kernels.

Right padding. In a causal batch whose padding all follows each sample's tokens (training batches as
tokenizers pad them), a real query never reaches a padded key, and a query at a padded position returns
o = 0 by the contract: the key mask is then redundant and dropped (masks()), for the fused kernels too
(their forward ran 1.145 ms with the mask, 1.022 without, at the main shape on an H100). The padded
rows are zeroed in the forward, and in the backward their lse is +inf (hide_rows), which gives them
probability 0 in FlashAttention's backward and in the prompt pass: no share in any gradient. Telling
right padding from other padding reads the mask on the host: one sync per mask tensor, remembered on
the tensor (the MoPs attention builds one per forward); a call that may not sync (tracing, CUDA graph
capture) keeps the mask.

The backward depends only on the saved (o, lse), so each direction chooses for itself. Measured on an
H100 (bf16, B=8 Hq=32 Hkv=8 d=128 J*L=128; docs/kernels.md): the cascade's backward beats the fused
one from S = 2048 (3.84 vs 4.39 ms; S = 4096: 11.7 vs 15.2 ms) and loses at S = 512, and its forward
loses at every S (the prompt pass re-reads q and o: 1.16 vs 1.03 ms at S = 2048). Modes
(MOPS_FAST_GPA_CASCADE, or override_configs(cascade=...)):
  auto  (default) the backward from CASCADE_MIN_S own keys on, the forward never; CUDA only
  bwd   the backward wherever eligible           1 / True   forward and backward      0 / False  never
Under the interpreter (CPU tests) only `bwd` and `1` apply, with a float32 PyTorch stand-in that keeps
FlashAttention's contract in place of the aten op, so the merge is tested on the CPU too.
"""

import functools
import os

import torch

from mops_fast.ops import triton_gated_prefix_attention as tk
from mops_fast.ops.gated_prefix_attention import masks

__all__ = ["applies", "masks", "gpa_forward", "gpa_backward"]

DEFAULT_MODE = "auto"
MODES = ("auto", "bwd", "0", "1")
CASCADE_MIN_S = 2048  # auto: own keys from which the cascade's backward was measured faster


def _mode() -> str:
    over = tk._OVERRIDE.get("cascade")
    if over is not None:
        return {True: "1", False: "0"}.get(over, over)
    mode = os.environ.get("MOPS_FAST_GPA_CASCADE", "").strip() or DEFAULT_MODE
    if mode not in MODES:
        raise ValueError(f"MOPS_FAST_GPA_CASCADE={mode!r}: use one of {MODES}")
    return mode


def applies(q, k, key_valid, causal: bool, backward: bool) -> bool:
    """Whether the cascade computes this forward (backward=False) or backward (see the module docstring);
    key_valid: the key mask after masks()."""
    mode = _mode()
    if mode == "0" or (mode == "bwd" and not backward) or torch.are_deterministic_algorithms_enabled():
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or key_valid is not None:
        return False
    Sq, Sk, d = q.shape[2], k.shape[2], q.shape[3]
    if (causal and Sq != Sk) or Sk == 0 or d % 8 or d > 256:
        return False
    if mode == "auto":
        if not (backward and q.is_cuda and Sk >= CASCADE_MIN_S):
            return False
    if q.is_cuda:
        return _flash_ok(q.device.index if q.device.index is not None else torch.cuda.current_device())
    return tk.INTERPRETED  # the CPU stand-in: only when asked for (tests)


@functools.lru_cache(maxsize=None)
def _flash_ok(device_index: int) -> bool:
    # NVIDIA builds with the flash kernels (the lse layout assumed here is CUDA FlashAttention's), sm80+.
    available = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)()
    return (available and torch.version.hip is None
            and torch.cuda.get_device_capability(device_index) >= (8, 0))


# --------------------------------------------------------------------------------------------------
# the own keys: FlashAttention (CUDA) or its float32 stand-in (interpreter)
# --------------------------------------------------------------------------------------------------
def _flash_forward(q, k, v, scale: float, causal: bool):
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return out[0], out[1]


def _flash_backward(do, q, k, v, o, lse, scale: float, causal: bool):
    # No dropout: the RNG state arguments are not read.
    rng = torch.empty(2, dtype=torch.uint64, device=q.device)
    unused = torch.empty((), dtype=torch.uint64, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        do, q, k, v, o, lse, None, None, q.shape[2], k.shape[2], 0.0, causal, rng, unused, scale=scale)
    return dq, dk, dv


def _scores(q, k, scale, causal):
    G = q.shape[1] // k.shape[1]
    kk = k.float().repeat_interleave(G, 1)
    s = q.float() @ kk.transpose(-1, -2) * scale
    if causal:
        Sq, Sk = q.shape[2], k.shape[2]
        hide = torch.arange(Sk, device=q.device)[None, :] > torch.arange(Sk - Sq, Sk, device=q.device)[:, None]
        s = s.masked_fill(hide, float("-inf"))
    return s, kk


def _standin_forward(q, k, v, scale: float, causal: bool):
    s, _ = _scores(q, k, scale, causal)
    lse = torch.logsumexp(s, -1)
    o = torch.exp(s - lse[..., None]) @ v.float().repeat_interleave(q.shape[1] // k.shape[1], 1)
    return o.to(q.dtype), lse


def _standin_backward(do, q, k, v, o, lse, scale: float, causal: bool):
    # FlashAttention's backward contract: probabilities from the given lse, Delta from the given o.
    B, Hkv, Sk, d = k.shape
    G = q.shape[1] // Hkv
    s, kk = _scores(q, k, scale, causal)
    p = torch.exp(s - lse[..., None].float())
    do32 = do.float()
    vv = v.float().repeat_interleave(G, 1)
    dv = p.transpose(-1, -2) @ do32
    ds = p * (do32 @ vv.transpose(-1, -2) - (do32 * o.float()).sum(-1, keepdim=True))
    dq = ds @ kk * scale
    dk = ds.transpose(-1, -2) @ q.float() * scale
    dk = dk.view(B, Hkv, G, Sk, d).sum(2)
    dv = dv.view(B, Hkv, G, Sk, d).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _own_forward(q, k, v, scale, causal):
    return (_flash_forward if q.is_cuda else _standin_forward)(q, k, v, scale, causal)


def _own_backward(do, q, k, v, o, lse, scale, causal):
    return (_flash_backward if q.is_cuda else _standin_backward)(do, q, k, v, o, lse, scale, causal)


# --------------------------------------------------------------------------------------------------
# the entry points the custom op calls
# --------------------------------------------------------------------------------------------------
def _no_own_keys(k):
    return k[:, :, :0]


def gpa_forward(q, k, v, prompt_k, prompt_v, gate_logw, key_valid, scale: float, causal: bool):
    """(o, lse) of gated-prefix attention: the cascade where it applies, else the fused kernel."""
    kv, qv = masks(q, k, key_valid, causal)
    if not applies(q, k, kv, causal, backward=False):
        return tk.gpa_forward(q, k, v, prompt_k, prompt_v, gate_logw, kv, scale, causal, query_valid=qv)
    o_s, lse_s = _own_forward(q, k, v, scale, causal)
    return tk.gpa_forward(q, _no_own_keys(k), _no_own_keys(v), prompt_k, prompt_v, gate_logw, None,
                          scale, False, init=(o_s, lse_s), query_valid=qv)


def gpa_backward(do, dlse, q, k, v, prompt_k, prompt_v, gate_logw, key_valid, o, lse, scale: float,
                 causal: bool):
    """Gradients of gated-prefix attention from the saved (o, lse), whichever forward made them."""
    kv, qv = masks(q, k, key_valid, causal)
    if dlse is not None or not applies(q, k, kv, causal, backward=True):
        return tk.gpa_backward(do, dlse, q, k, v, prompt_k, prompt_v, gate_logw, kv, o, lse,
                               scale, causal, query_valid=qv)
    lse = tk.hide_rows(lse, qv)  # padded queries: no share in FlashAttention's gradients nor the prompts'
    dq, dk, dv = _own_backward(do, q, k, v, o, lse, scale, causal)
    if dq.stride(-1) != 1:
        dq = dq.contiguous()
    dq, _, _, dpk, dpv, dlogw = tk.gpa_backward(
        do, None, q, _no_own_keys(k), _no_own_keys(v), prompt_k, prompt_v, gate_logw, None, o, lse, scale,
        False, dq_init=dq)
    return dq, dk, dv, dpk, dpv, dlogw
