"""Gated-prefix attention: one softmax over J*L expert prompt tokens and the sample's own keys.

Contract (DESIGN.md §1 and §4):
  q            (B, Hq, Sq, d)       queries; query i sits at absolute position Sk - Sq + i
  k, v         (B, Hkv, Sk, d)      the sample's own keys/values (Hq a multiple of Hkv, GQA)
  prompt_k/v   (J, L, Hkv, d)       expert prompts shared by the batch (mode `scale`), or
               (B, J, L, Hkv, d)    per-sample prompts (mode `mix` after its pre-mix, J == 1)
  gate_logw    (B, J) or None       log gate weights; -inf drops an expert; None means all zeros
  key_valid    (B, Sk) bool or None True for real tokens, False for padding; None means all valid
  causal       own key j is visible to query i iff j <= Sk - Sq + i (prompt tokens always visible)
In causal attention a query whose own position is padding (key_valid[b, Sk - Sq + i] False, Sq <= Sk)
returns o = 0 and lse = -inf and passes no gradient: nothing real reads it in a causal model, and it lets a
right-padded causal batch drop the key mask altogether (prefix_cascade.py), so that it runs at unpadded
speed. Without causality (causal=False) a query has no position among the keys: it sees every valid key
(a decode step over all of a static cache's slots, the unfilled ones invalid).
Score of prompt token (e, t): q . PK[e, t] * scale + logw[b, e]; of own token j: q . k_j * scale.
Returns o (B, Hq, Sq, d) in q's dtype and, from the *_with_lse variant, lse (B, Hq, Sq) float32.

This file holds the pure-PyTorch reference and the public entry point that dispatches by device:
  CUDA tensors (fp16 / bf16 / fp32)  -> the fused Triton kernels (triton_gated_prefix_attention.py),
                                       through the custom op mops_fast::gated_prefix_attention, so that
                                       torch.compile captures the call with no graph break; without key
                                       padding, from 2048 keys, the backward is the shared-prefix cascade
                                       (prefix_cascade.py: FlashAttention for the own keys)
  CPU tensors, float64, no Triton    -> the reference, with plain autograd; but o alone of fp32 / bf16 /
                                       float64 when nothing needs a gradient (generate, evaluation): one
                                       SDPA call over [prompts; own keys] with an additive mask
                                       (_prefix_sdpa; on the 2-core CPU at SmolLM2's attention shapes 1.7x
                                       faster at decode, 4x at a 256-token prefill); and o alone in
                                       training with fp32 or bf16 activations: the CPU cascade
                                       (cpu_cascade.py: torch's CPU flash op for the own keys; in fp32
                                       2.6-7.3x faster than the reference and 2.5-14x less saved memory
                                       from 256 to 2048 tokens, benchmarks/bench_cpu_attention.py;
                                       MOPS_FAST_CPU_CASCADE=0 keeps the reference)
`backend="triton"` (or MOPS_FAST_FORCE_TRITON=1) sends CPU tensors through the Triton kernels too,
which works under TRITON_INTERPRET=1 (the interpreter tests); `backend="reference"` forces the
reference.
"""

import importlib.util
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mops_fast.ops.tracing import traced

__all__ = [
    "gated_prefix_attention",
    "gated_prefix_attention_with_lse",
    "gated_prefix_attention_ref",
    "check_inputs",
    "query_valid",
    "right_padded",
    "masks",
    "visible_keys",
    "prompt_keys_values",
]


def check_inputs(q, k, v, prompt_k, prompt_v, gate_logw, key_valid):
    """Validate shapes, dtypes and devices; raise ValueError naming the problem and the fix."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"gated_prefix_attention: q, k, v must be 4-D (B, H, S, d); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, Hq, Sq, d = q.shape
    Bk, Hkv, Sk, dk = k.shape
    if k.shape != v.shape:
        raise ValueError(f"gated_prefix_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must match")
    if Bk != B or dk != d:
        raise ValueError(
            f"gated_prefix_attention: k/v {tuple(k.shape)} do not fit q {tuple(q.shape)} "
            "(batch and head dim must agree)"
        )
    if Hq % Hkv != 0:
        raise ValueError(f"gated_prefix_attention: Hq={Hq} must be a multiple of Hkv={Hkv} (GQA)")
    if Sk < Sq:
        raise ValueError(f"gated_prefix_attention: key length {Sk} shorter than query length {Sq}")
    if prompt_k.shape != prompt_v.shape:
        raise ValueError(
            f"gated_prefix_attention: prompt_k {tuple(prompt_k.shape)} and prompt_v "
            f"{tuple(prompt_v.shape)} must match"
        )
    if prompt_k.dim() == 4:
        J, L, Hp, dp = prompt_k.shape
    elif prompt_k.dim() == 5:
        Bp, J, L, Hp, dp = prompt_k.shape
        if Bp != B:
            raise ValueError(f"gated_prefix_attention: per-sample prompts have batch {Bp}, q has {B}")
    else:
        raise ValueError(
            "gated_prefix_attention: prompts must be (J, L, Hkv, d) or (B, J, L, Hkv, d); "
            f"got {tuple(prompt_k.shape)}"
        )
    if Hp != Hkv or dp != d:
        raise ValueError(
            f"gated_prefix_attention: prompts {tuple(prompt_k.shape)} need Hkv={Hkv} heads of dim {d}"
        )
    if J < 1 or L < 1:
        raise ValueError(f"gated_prefix_attention: need J >= 1 and L >= 1 prompt tokens, got J={J}, L={L}")
    if gate_logw is not None and gate_logw.shape != (B, J):
        raise ValueError(
            f"gated_prefix_attention: gate_logw must be (B, J) = ({B}, {J}); got {tuple(gate_logw.shape)}"
        )
    if key_valid is not None:
        if key_valid.shape != (B, Sk):
            raise ValueError(
                f"gated_prefix_attention: key_valid must be (B, Sk) = ({B}, {Sk}); got {tuple(key_valid.shape)}"
            )
        if key_valid.dtype != torch.bool:
            raise ValueError(f"gated_prefix_attention: key_valid must be bool, got {key_valid.dtype}")
    # Called on every attention call, every decode step: the common case passes with plain comparisons,
    # and only a failure builds the per-tensor tables that name the culprit.
    dev = q.device
    if (k.device != dev or v.device != dev or prompt_k.device != dev or prompt_v.device != dev
            or (gate_logw is not None and gate_logw.device != dev)
            or (key_valid is not None and key_valid.device != dev)):
        tensors = {"q": q, "k": k, "v": v, "prompt_k": prompt_k, "prompt_v": prompt_v}
        if gate_logw is not None:
            tensors["gate_logw"] = gate_logw
        if key_valid is not None:
            tensors["key_valid"] = key_valid
        devs = {n: t.device for n, t in tensors.items()}
        raise ValueError(f"gated_prefix_attention: all inputs must be on one device; got {devs}")
    for n, t in (("q", q), ("k", k), ("v", v), ("prompt_k", prompt_k), ("prompt_v", prompt_v)):
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"gated_prefix_attention: {n} has unsupported dtype {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"gated_prefix_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def query_valid(key_valid: Optional[Tensor], Sq: int, Sk: int, causal: bool = True) -> Optional[Tensor]:
    """(B, Sq) bool: whether query i's own position Sk - Sq + i is a real token (None: no padding, not
    causal, or more queries than keys, whose positions the keys do not cover). See the contract above."""
    if key_valid is None or Sq > Sk or not causal:
        return None
    return key_valid[:, Sk - Sq:]


def right_padded(key_valid) -> bool:
    """Whether every sample's padding follows its tokens (each row of the mask is non-increasing).
    Reads the mask on the host once per tensor and version; False where the host may not wait."""
    seen = getattr(key_valid, "_mops_right_padded", None)
    if seen is not None and seen[0] == key_valid._version:
        return seen[1]
    if traced(key_valid) or (key_valid.is_cuda and torch.cuda.is_current_stream_capturing()):
        return False
    result = not bool((key_valid[:, 1:] & ~key_valid[:, :-1]).any())
    key_valid._mops_right_padded = (key_valid._version, result)
    return result


def masks(q, k, key_valid, causal: bool):
    """(key mask, query mask): a causal self-attention batch (Sq == Sk) with right padding needs no key
    mask, only the queries at real positions (the contract above); any other key mask is kept, and the
    query mask is then left to be derived from it (None)."""
    Sq, Sk = q.shape[2], k.shape[2]
    if key_valid is not None and causal and Sq == Sk and right_padded(key_valid):
        return None, query_valid(key_valid, Sq, Sk)
    return key_valid, None


def visible_keys(key_valid: Optional[Tensor], Sq: int, Sk: int, causal: bool, device) -> Optional[Tensor]:
    """(B or 1, 1, Sq or 1, Sk) bool, broadcastable: which own keys each query sees (the causal diagonal of
    the contract and the key mask); None when every query sees every key."""
    visible = None
    if causal and Sq > 1:  # one query sits at the last position: it sees every key
        qpos = torch.arange(Sk - Sq, Sk, device=device)
        visible = (torch.arange(Sk, device=device)[None, :] <= qpos[:, None])[None, None]
    if key_valid is not None:
        kv = key_valid[:, None, None, :]
        visible = kv if visible is None else (visible & kv)
    return visible


def prompt_keys_values(prompt_k: Tensor, prompt_v: Tensor):
    """(J, L, Hkv, d) shared or (B, J, L, Hkv, d) per-sample prompts -> keys and values (Bp, Hkv, J*L, d)
    (Bp = 1 when shared), J, L."""
    if prompt_k.dim() == 4:
        Bp, (J, L, Hkv, d) = 1, prompt_k.shape
    else:
        Bp, J, L, Hkv, d = prompt_k.shape
    return (prompt_k.reshape(Bp, J * L, Hkv, d).transpose(1, 2), prompt_v.reshape(Bp, J * L, Hkv, d).transpose(1, 2),
            J, L)


def gated_prefix_attention_ref(
    q, k, v, prompt_k, prompt_v, gate_logw=None, key_valid=None, *, scale=None, causal=True
):
    """Pure-PyTorch gated-prefix attention. Returns (o, lse); differentiable in every float input.

    Computes scores in float32 (float64 stays float64) without repeating K/V per query head: the
    query heads of one KV group are folded into the query axis.
    """
    B, Hq, Sq, d = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32

    pk, pv, J, L = prompt_keys_values(prompt_k, prompt_v)
    P = J * L
    pk, pv = pk.to(cdt), pv.to(cdt)

    qg = q.to(cdt).reshape(B, Hkv, G * Sq, d)
    s_p = torch.matmul(qg, pk.transpose(-1, -2)) * scale  # (B, Hkv, G*Sq, P)
    if gate_logw is not None:
        bias = gate_logw.to(cdt)[:, :, None].expand(B, J, L).reshape(B, 1, 1, P)
        s_p = s_p + bias
    s_s = torch.matmul(qg, k.to(cdt).transpose(-1, -2)) * scale  # (B, Hkv, G*Sq, Sk)

    visible = visible_keys(key_valid, Sq, Sk, causal, q.device)
    if visible is not None:  # one more axis for the query heads of a KV group
        s_s = s_s.view(B, Hkv, G, Sq, Sk).masked_fill(~visible[:, :, None], float("-inf")).view(B, Hkv, G * Sq, Sk)

    s = torch.cat([s_p, s_s], dim=-1)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - lse)
    o = torch.matmul(p[..., :P], pv) + torch.matmul(p[..., P:], v.to(cdt))
    o = o.view(B, Hq, Sq, d).to(q.dtype)
    lse = lse.view(B, Hq, Sq).to(torch.float32 if cdt == torch.float32 else cdt)
    qv = query_valid(key_valid, Sq, Sk, causal)
    if qv is not None:
        drop = ~qv[:, None, :]
        o = o.masked_fill(drop[..., None], 0.0)
        lse = lse.masked_fill(drop, float("-inf"))
    return o, lse


# --------------------------------------------------------------------------------------------------
# fused path: custom ops around the Triton launchers
# --------------------------------------------------------------------------------------------------
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _kernels():
    # Imported on first use: importing triton costs time and the CPU path never needs it.
    # prefix_cascade dispatches between the shared-prefix cascade and the single fused kernel.
    from mops_fast.ops import prefix_cascade

    return prefix_cascade


@torch.library.custom_op("mops_fast::gated_prefix_attention", mutates_args=())
def _gpa_fused(
    q: Tensor, k: Tensor, v: Tensor, prompt_k: Tensor, prompt_v: Tensor,
    gate_logw: Optional[Tensor], key_valid: Optional[Tensor], scale: float, causal: bool,
) -> tuple[Tensor, Tensor]:
    check_inputs(q, k, v, prompt_k, prompt_v, gate_logw, key_valid)  # also for direct torch.ops callers
    return _kernels().gpa_forward(q, k, v, prompt_k, prompt_v, gate_logw, key_valid, scale, causal)


@_gpa_fused.register_fake
def _gpa_fused_fake(q, k, v, prompt_k, prompt_v, gate_logw, key_valid, scale, causal):
    B, Hq, Sq, d = q.shape
    return q.new_empty((B, Hq, Sq, d)), q.new_empty((B, Hq, Sq), dtype=torch.float32)


@torch.library.custom_op("mops_fast::gated_prefix_attention_backward", mutates_args=())
def _gpa_fused_backward(
    grad_o: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, prompt_k: Tensor,
    prompt_v: Tensor, gate_logw: Optional[Tensor], key_valid: Optional[Tensor], o: Tensor,
    lse: Tensor, scale: float, causal: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _kernels().gpa_backward(
        grad_o, grad_lse, q, k, v, prompt_k, prompt_v, gate_logw, key_valid, o, lse, scale, causal
    )


@_gpa_fused_backward.register_fake
def _gpa_fused_backward_fake(grad_o, grad_lse, q, k, v, prompt_k, prompt_v, gate_logw, key_valid, o,
                             lse, scale, causal):
    B, J = q.shape[0], prompt_k.shape[-4]
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            prompt_k.new_empty(prompt_k.shape), prompt_v.new_empty(prompt_v.shape),
            q.new_empty((B, J), dtype=torch.float32))


def _gpa_setup_context(ctx, inputs, output):
    q, k, v, prompt_k, prompt_v, gate_logw, key_valid, scale, causal = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, prompt_k, prompt_v, gate_logw, key_valid, o, lse)
    ctx.scale, ctx.causal = scale, causal
    # An output nothing used gets None, not zeros: a None grad_lse lets the backward skip the dlse
    # term, and the shared-prefix cascade needs it (FlashAttention's backward takes no dlse).
    ctx.set_materialize_grads(False)


def _grads(ctx, grad_o, grad_lse, backward):
    """The autograd backward of both wrappers; `backward` is the op (traced) or the launcher (eager)."""
    q, k, v, prompt_k, prompt_v, gate_logw, key_valid, o, lse = ctx.saved_tensors
    if grad_o is None:
        grad_o = torch.zeros_like(o)
    dq, dk, dv, dpk, dpv, dlogw = backward(
        grad_o, grad_lse, q, k, v, prompt_k, prompt_v, gate_logw, key_valid, o, lse, ctx.scale, ctx.causal
    )
    dlogw = dlogw.to(gate_logw.dtype) if gate_logw is not None else None
    return dq, dk, dv, dpk, dpv, dlogw, None, None, None


def _gpa_backward(ctx, grad_o, grad_lse):
    return _grads(ctx, grad_o, grad_lse, _gpa_fused_backward)


_gpa_fused.register_autograd(_gpa_backward, setup_context=_gpa_setup_context)


class _FusedGatedPrefixAttention(torch.autograd.Function):
    """Eager training: the custom op's forward, autograd context and backward without its dispatch,
    which cost 70 us a call forward and about as much backward on this project's CPU (host time that
    shows on a GPU wherever the kernels are shorter: small batches, short sequences)."""

    @staticmethod
    def forward(ctx, q, k, v, prompt_k, prompt_v, gate_logw, key_valid, scale, causal):
        out = _kernels().gpa_forward(q, k, v, prompt_k, prompt_v, gate_logw, key_valid, scale, causal)
        _gpa_setup_context(ctx, (q, k, v, prompt_k, prompt_v, gate_logw, key_valid, scale, causal), out)
        return out

    @staticmethod
    def backward(ctx, grad_o, grad_lse):
        return _grads(ctx, grad_o, grad_lse, _kernels().gpa_backward)


def _fused(q, k, v, prompt_k, prompt_v, gate_logw, key_valid, scale: float, causal: bool):
    # Eager calls launch the kernels directly (inference) or through a plain autograd.Function
    # (training): the custom op's dispatch and autograd wrapper cost more host time than the rest of the
    # launch path, which shows at decode and at small shapes, where the kernels take microseconds.
    # Tracing (compile, fake or meta tensors) keeps the op: it has the fake implementations.
    if not traced(q):
        if not _needs_grad(q, k, v, prompt_k, prompt_v, gate_logw):
            return _kernels().gpa_forward(q, k, v, prompt_k, prompt_v, gate_logw, key_valid, scale, causal)
        return _FusedGatedPrefixAttention.apply(q, k, v, prompt_k, prompt_v, gate_logw, key_valid, scale, causal)
    return _gpa_fused(q, k, v, prompt_k, prompt_v, gate_logw, key_valid, scale, causal)


def _use_fused(q: Tensor, backend: Optional[str]) -> bool:
    if backend == "reference":
        return False
    if backend == "triton":
        return True
    if backend is not None:
        raise ValueError(f"gated_prefix_attention: backend must be None, 'triton' or 'reference'; got {backend!r}")
    if not _HAS_TRITON or q.dtype == torch.float64:
        return False
    if q.is_cuda:
        return True
    return os.environ.get("MOPS_FAST_FORCE_TRITON", "0") == "1"


def gated_prefix_attention_with_lse(
    q, k, v, prompt_k, prompt_v, gate_logw=None, key_valid=None, *, scale=None, causal=True, backend=None
):
    """Public entry point: (o, lse). CUDA tensors take the fused kernel (see the module docstring)."""
    check_inputs(q, k, v, prompt_k, prompt_v, gate_logw, key_valid)
    if _use_fused(q, backend):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        return _fused(q, k, v, prompt_k, prompt_v, gate_logw, key_valid, scale, bool(causal))
    return gated_prefix_attention_ref(
        q, k, v, prompt_k, prompt_v, gate_logw, key_valid, scale=scale, causal=causal
    )


def _prefix_sdpa(q, k, v, prompt_k, prompt_v, gate_logw, key_valid, scale, causal):
    """o of the reference's function by one fused SDPA call: the prompts concatenated in front of the
    sample's keys (expanded over the batch: a view until the concatenation), and an additive mask holding
    the log gate weights on the prompt columns and -inf on the own keys a query must not see. Rows that
    see nothing get 0 (as from the fused kernels) where the reference gives NaN. For inference: the
    mask's gradient would take SDPA's unfused math path."""
    B, Hq, Sq, d = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    pk, pv, J, L = prompt_keys_values(prompt_k, prompt_v)
    P = J * L
    if pk.dtype != q.dtype:
        pk, pv = pk.to(q.dtype), pv.to(q.dtype)
    kk = torch.cat([pk.expand(B, Hkv, P, d), k], dim=2)
    vv = torch.cat([pv.expand(B, Hkv, P, d), v], dim=2)
    # Own keys: 0 where visible, -inf where hidden.
    visible = visible_keys(key_valid, Sq, Sk, causal, q.device)
    if gate_logw is None:
        pre = None
    else:
        pre = gate_logw.to(q.dtype).unsqueeze(-1).expand(B, J, L).reshape(B, 1, 1, P)
    if visible is None:
        # every query sees every own key (decode, no padding): one row, the gate bias then zeros, built
        # in one op (the same values and layout as the concatenation below)
        if pre is None:
            mask = torch.zeros((B, 1, 1, P + Sk), dtype=q.dtype, device=q.device)
        else:
            mask = torch.constant_pad_nd(pre, (0, Sk))
    else:
        own = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~visible, float("-inf"))
        if pre is None:
            pre = torch.zeros((1, 1, 1, P), dtype=q.dtype, device=q.device)
        rows = own.shape[2]  # Sq, or 1 when every query sees the same keys (the mask broadcasts)
        mask = torch.cat([pre.expand(B, 1, rows, P), own.expand(B, 1, rows, Sk)], dim=-1)
    o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale, enable_gqa=Hq != Hkv)
    qv = query_valid(key_valid, Sq, Sk, causal)
    return o if qv is None else o.masked_fill(~qv[:, None, :, None], 0.0)


def _cpu_cascade_applies(q) -> bool:
    """CPU training with fp32 or bf16 activations, untraced, where torch has the CPU flash op
    (cpu_cascade.py); MOPS_FAST_CPU_CASCADE=0 keeps the reference."""
    if q.device.type != "cpu" or traced(q) or os.environ.get("MOPS_FAST_CPU_CASCADE", "1") == "0":
        return False
    if q.dtype not in (torch.float32, torch.bfloat16):
        return False
    from mops_fast.ops import cpu_cascade

    return cpu_cascade.available()


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def gated_prefix_attention(
    q, k, v, prompt_k, prompt_v, gate_logw=None, key_valid=None, *, scale=None, causal=True, backend=None
):
    """Gated-prefix attention output o (B, Hq, Sq, d). See the module docstring for the contract."""
    if backend is None and not _use_fused(q, None):
        grad = _needs_grad(q, k, v, prompt_k, prompt_v, gate_logw)
        if not grad and q.dtype in (torch.float32, torch.float64, torch.bfloat16):
            check_inputs(q, k, v, prompt_k, prompt_v, gate_logw, key_valid)
            return _prefix_sdpa(q, k, v, prompt_k, prompt_v, gate_logw, key_valid, scale, causal)
        if grad and _cpu_cascade_applies(q):
            from mops_fast.ops import cpu_cascade

            check_inputs(q, k, v, prompt_k, prompt_v, gate_logw, key_valid)
            scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
            return cpu_cascade.cascade_attention(q, k, v, prompt_k, prompt_v, gate_logw, key_valid, scale, causal)
    return gated_prefix_attention_with_lse(
        q, k, v, prompt_k, prompt_v, gate_logw, key_valid, scale=scale, causal=causal, backend=backend
    )[0]
