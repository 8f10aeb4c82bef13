"""Gated-prefix attention for CPU training (fp32 or bf16 activations): torch's CPU flash attention for the
own keys, plain matmuls for the J*L prompt tokens, merged through the softmax state (the shared-prefix
cascade that prefix_cascade.py runs on CUDA).

  forward   (o_s, lse_s) = the aten CPU flash op over the sample's own keys (causal, or with the additive
            mask that key padding or Sq != Sk needs); the prompts' scores s_p = q . PK * scale + logw[e]
            are small (G*Sq x J*L a KV head), so lse = logaddexp(lse_s, logsumexp(s_p)) and
            o = o_s * exp(lse_s - lse) + exp(s_p - lse) @ PV.
  backward  the flash op's backward, given the *total* o and lse, yields the own keys' share of dq and
            their dk, dv exactly (P = exp(s - lse), Delta = rowsum(do * o)); the prompt share follows from
            dS_p = P_p * (do . PV - Delta): dq += dS_p PK scale, dPK = dS_p^T q scale, dPV = P_p^T do,
            dlogw[e] = the sum of dS_p over expert e's columns.
The reference (gated_prefix_attention_ref) materializes the (G*Sq) x (J*L + Sk) scores in autograd and
takes 2.6x as long for a forward and backward at SmolLM2-135M's attention shape (B=4, Hq=9, Hkv=3, d=64,
S=256, J*L=64, fp32, the project's 2-core CPU), 7.3x at S=2048, and saves 14x the bytes for the backward
there (benchmarks/bench_cpu_attention.py). Same contract (gated_prefix_attention.py): padded queries give
o = 0 and no gradient, and so do rows that see nothing.
"""
from __future__ import annotations

import functools

import torch

from mops_fast.ops.gated_prefix_attention import masks, prompt_keys_values, query_valid, visible_keys

__all__ = ["available", "cascade_attention"]

_INF = float("inf")


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether this torch has the CPU flash op with an additive mask, forward and backward (torch 2.3+);
    probed once on tiny inputs."""
    try:
        q = torch.linspace(-1, 1, 48).reshape(1, 2, 3, 8)  # not randn: the probe must not move the global RNG
        k = q.flip(-1).contiguous()
        mask = torch.zeros(1, 1, 3, 3)
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, k, 0.0, False, attn_mask=mask)
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            torch.ones_like(o), q, k, k, o, lse, 0.0, False, attn_mask=mask)
        return True
    except (AttributeError, RuntimeError, TypeError):
        return False


def _own_mask(q, k, key_valid, causal: bool):
    """(is_causal, additive mask or None, rows that see an own key or None) for the flash op. Flash's
    is_causal is the contract's diagonal only when Sq == Sk; otherwise the visibility is a mask."""
    B, _, Sq, _ = q.shape
    Sk = k.shape[2]
    if key_valid is None and causal and Sq == Sk:
        return True, None, None
    visible = visible_keys(key_valid, Sq, Sk, causal, q.device)
    if visible is None:
        return False, None, None
    mask = torch.zeros((), dtype=q.dtype).masked_fill(~visible, -_INF).expand(B, 1, Sq, Sk).contiguous()
    return False, mask, visible.any(-1).expand(B, 1, Sq)  # (B, 1, Sq)


class _CascadeCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, prompt_k, prompt_v, gate_logw, key_valid, scale: float, causal: bool):
        B, Hq, Sq, d = q.shape
        Hkv = k.shape[1]
        G = Hq // Hkv
        kv_mask, qv = masks(q, k, key_valid, causal)  # right padding: no key mask
        if qv is None:
            qv = query_valid(kv_mask, Sq, k.shape[2], causal)
        is_causal, mask, sees_own = _own_mask(q, k, kv_mask, causal)
        # The own keys repeated over their query heads: the flash op's own GQA support is newer than torch 2.4.
        ke = k.repeat_interleave(G, 1) if G > 1 else k.contiguous()
        ve = v.repeat_interleave(G, 1) if G > 1 else v.contiguous()
        q = q.contiguous()
        o_s, lse_s = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, ke, ve, 0.0, is_causal, attn_mask=mask, scale=scale)
        if sees_own is not None:  # the op returns lse 0 (torch 2.13: and o 0) for a row whose keys are all masked
            lse_s = lse_s.masked_fill(~sees_own, -_INF)
            o_s = o_s.masked_fill(~sees_own[..., None], 0.0)

        # the prompts and the merge in fp32 (bf16 activations: the prompts stay fp32, as on the GPU)
        pk, pv, J, L = prompt_keys_values(prompt_k, prompt_v)
        pk, pv = pk.float(), pv.float()
        rows = (B, Hkv, G * Sq)
        qg = q.view(*rows, d).float()
        s_p = torch.matmul(qg, pk.transpose(-1, -2)) * scale  # (B, Hkv, G*Sq, P)
        if gate_logw is not None:
            s_p = s_p + gate_logw.float()[:, :, None].expand(B, J, L).reshape(B, 1, 1, J * L)
        lse_s = lse_s.reshape(rows)  # the op returns (B, Sq, H)-major layouts
        lse = torch.logaddexp(lse_s, torch.logsumexp(s_p, -1))
        seen = torch.isfinite(lse)  # a row that sees nothing: o = 0, no gradient
        lse_safe = torch.where(seen, lse, 0.0)
        p_p = torch.exp(s_p - lse_safe[..., None])  # 0 where s_p is -inf (dropped experts, unseen rows)
        o = o_s.reshape(*rows, d).float() * torch.exp(lse_s - lse_safe)[..., None] + torch.matmul(p_p, pv)
        hide = ~seen
        if qv is not None:
            hide = hide | ~qv[:, None, None, :].expand(B, Hkv, G, Sq).reshape(rows)
        o = o.masked_fill(hide[..., None], 0.0).view(B, Hq, Sq, d).to(q.dtype)  # the backward's o, as returned
        # backward: lse +inf on hidden rows gives them probability 0 everywhere (their do is zeroed too)
        lse_b = lse.masked_fill(hide, _INF)
        ctx.save_for_backward(q, ke, ve, pk, pv, o, lse_b, p_p, hide, mask)
        ctx.meta = (scale, is_causal, G, J, L, prompt_k.dim(), prompt_k.dtype,
                    None if gate_logw is None else gate_logw.dtype)
        return o

    @staticmethod
    def backward(ctx, grad_o):
        q, ke, ve, pk, pv, o, lse_b, p_p, hide, mask = ctx.saved_tensors
        scale, is_causal, G, J, L, pdim, pdtype, gdtype = ctx.meta
        B, Hq, Sq, d = q.shape
        Hkv = Hq // G
        rows = (B, Hkv, G * Sq)
        go = grad_o.contiguous().view(*rows, d).masked_fill(hide[..., None], 0.0)
        dq, dke, dve = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            go.view(B, Hq, Sq, d), q, ke, ve, o, lse_b.view(B, Hq, Sq), 0.0, is_causal, attn_mask=mask, scale=scale)
        need = ctx.needs_input_grad
        dk = dke.view(B, Hkv, G, -1, d).float().sum(2).to(ke.dtype) if need[1] else None
        dv = dve.view(B, Hkv, G, -1, d).float().sum(2).to(ve.dtype) if need[2] else None
        # the prompts' share (fp32): dS_p = P_p * (do . PV - Delta), Delta = rowsum(do * o) of the total o
        gof = go.float()
        delta = (gof * o.view(*rows, d).float()).sum(-1, keepdim=True)
        ds = p_p * (torch.matmul(gof, pv.transpose(-1, -2)) - delta)  # (B, Hkv, G*Sq, P)
        if need[0]:
            dq = (dq.float() + (torch.matmul(ds, pk) * scale).view(B, Hq, Sq, d)).to(q.dtype)
        else:
            dq = None

        def to_prompt_shape(t):  # (B, Hkv, P, d) -> the prompts' own shape, summed over the batch if shared
            t = t.transpose(1, 2).reshape(B, J, L, Hkv, d)
            return (t.sum(0) if pdim == 4 else t).to(pdtype)

        dpk = to_prompt_shape(torch.matmul(ds.transpose(-1, -2), q.view(*rows, d).float()) * scale) if need[3] else None
        dpv = to_prompt_shape(torch.matmul(p_p.transpose(-1, -2), gof)) if need[4] else None
        dlw = ds.sum((1, 2)).view(B, J, L).sum(-1).to(gdtype) if gdtype is not None and need[5] else None
        return dq, dk, dv, dpk, dpv, dlw, None, None, None


def cascade_attention(q, k, v, prompt_k, prompt_v, gate_logw, key_valid, scale: float, causal: bool):
    """o (B, Hq, Sq, d) of gated-prefix attention for fp32 or bf16 CPU activations (prompts and gate in
    any float dtype), differentiable in q, k, v, the prompts and gate_logw (inputs already checked:
    gated_prefix_attention.check_inputs)."""
    return _CascadeCPU.apply(q, k, v, prompt_k, prompt_v, gate_logw, key_valid, float(scale), bool(causal))
