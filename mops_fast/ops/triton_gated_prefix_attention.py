"""Triton kernels for gated-prefix attention (forward and backward) and their launchers.

The contract is in gated_prefix_attention.py; docs/kernels.md explains the tiling. In short:

forward   one program per (batch, query head, query block) -- or, for short query blocks (decode),
          per (batch, KV head, block of the group's query rows) so that one K/V read serves all the
          query heads of a GQA group. It streams the J*L prompt tokens (shared by the batch, biased per
          sample by the log gate weight, tiles whose experts are all dropped are skipped), then the
          sample's own keys (causal and key-padding masks), with an online softmax in base 2;
          queries at padded positions are written as o = 0, lse = -inf (they see +inf in the backward).
backward  Delta = rowsum(o * do) - dlse; then
          dK/dV   one program per (batch, KV head, key block) over the group's query heads and the
                  query blocks that see the block: own keys are written directly; prompt blocks are
                  reduced over the batch with fp32 atomics into one (P, Hkv, d) buffer (never a
                  per-sample copy), and their row sums of dS give d logw per (batch, KV head, token).
          dQ      one program per (batch, query head, query block) over prompts and own keys.

Everything is computed in float32 inside the kernels; matrix products take the input dtype (bf16/fp16)
or float32 in IEEE mode (no TF32 unless torch.backends.cuda.matmul.allow_tf32 says so).
"""

import os
import warnings
from contextlib import contextmanager

import torch
import triton
import triton.language as tl

from mops_fast.ops.gated_prefix_attention import query_valid as gpa_query_valid

try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - other Triton layouts: no fallback, the error propagates
    class OutOfResources(Exception):
        pass

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: the interpreter's bf16 dot is wrong, so run it in fp32 there (operands already rounded).
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _load_2d(ptrs, row_ok, offs_d, ROW_CHECK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # Masks only where needed: unmasked loads stay 16-byte vectorized on the main path.
    if ROW_CHECK:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _store_2d(ptrs, x, row_ok, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    if HEAD_DIM == BLOCK_D:
        tl.store(ptrs, x, mask=row_ok[:, None])
    else:
        tl.store(ptrs, x, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _key_bias(KVM, LWb, offs_n, n_ok, L, IS_PROMPT: tl.constexpr, HAS_KVM: tl.constexpr,
              BOUND: tl.constexpr):
    """Additive per-key bias in log2 units: log gate weight for prompts, -inf for padding / OOB keys."""
    if IS_PROMPT:
        if BOUND:
            bias = tl.load(LWb + offs_n // L, mask=n_ok, other=float("-inf")) * 1.4426950408889634
        else:
            bias = tl.load(LWb + offs_n // L) * 1.4426950408889634
    else:
        if HAS_KVM:
            if BOUND:
                bias = tl.load(KVM + offs_n, mask=n_ok, other=float("-inf"))
            else:
                bias = tl.load(KVM + offs_n)
        else:
            if BOUND:
                bias = tl.where(n_ok, 0.0, float("-inf"))
            else:
                bias = tl.zeros(offs_n.shape, tl.float32)
    return bias


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_step(acc, l_i, m_i, s, v, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    # Online softmax in base 2; m_use keeps fully masked rows at exp2(-inf) = 0 instead of NaN.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE, UPCAST)
    return acc, l_i, m_new


@triton.jit
def _fwd_prompts(acc, l_i, m_i, q, Kb, Vb, stride_kn, stride_vn, P, LWb, L, offs_d, qk_scale,
                 BOUND: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_N: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    # num_stages=1: the loop body sits under a data-dependent `if`, keep the pipeliner out of it.
    for start_n in tl.range(0, P, BLOCK_N, num_stages=1):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < P
        bias = _key_bias(LWb, LWb, offs_n, n_ok, L, True, False, BOUND)
        # Skip tiles whose experts all have weight 0 (log weight -inf): top-k gating.
        if tl.max(bias, 0) > float("-inf"):
            k = _load_2d(Kb + offs_n[:, None] * stride_kn + offs_d[None, :], n_ok, offs_d,
                         BOUND, HEAD_DIM, BLOCK_D)
            s = _dot(q, tl.trans(k), IEEE, UPCAST) * qk_scale + bias[None, :]
            v = _load_2d(Vb + offs_n[:, None] * stride_vn + offs_d[None, :], n_ok, offs_d,
                         BOUND, HEAD_DIM, BLOCK_D)
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, s, v, IEEE, UPCAST)
    return acc, l_i, m_i


@triton.jit
def _fwd_own(acc, l_i, m_i, q, Kb, Vb, stride_kn, stride_vn, lo, hi, N, q_pos, offs_d, KVM, qk_scale,
             CAUSAL_MASK: tl.constexpr, BOUND: tl.constexpr, HAS_KVM: tl.constexpr,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
             IEEE: tl.constexpr, UPCAST: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        k = _load_2d(Kb + offs_n[:, None] * stride_kn + offs_d[None, :], n_ok, offs_d,
                     BOUND, HEAD_DIM, BLOCK_D)
        s = _dot(q, tl.trans(k), IEEE, UPCAST) * qk_scale
        if HAS_KVM or BOUND:
            s = s + _key_bias(KVM, KVM, offs_n, n_ok, 1, False, HAS_KVM, BOUND)[None, :]
        if CAUSAL_MASK:
            s = tl.where(offs_n[None, :] <= q_pos[:, None], s, float("-inf"))
        v = _load_2d(Vb + offs_n[:, None] * stride_vn + offs_d[None, :], n_ok, offs_d,
                     BOUND, HEAD_DIM, BLOCK_D)
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, s, v, IEEE, UPCAST)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["Hq", "Hkv", "G", "Sq", "Sk", "P", "L"])
def _gpa_fwd_kernel(
    Q, K, V, PK, PV, LW, KVM, RVM, O, LSE, O0, LSE0,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
    spkb, spkp, spkh, spvb, spvp, spvh,
    slwb, skvmb, srvmb, sob, soh, som, so0b, so0h, so0m,
    Hq, Hkv, G, Sq, Sk, P, L, qk_scale,
    IS_CAUSAL: tl.constexpr, HAS_KVM: tl.constexpr, HAS_RVM: tl.constexpr, PACK: tl.constexpr,
    EVEN_P: tl.constexpr, HAS_INIT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    # Heaviest query blocks (most causal keys) first: better tail balance.
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if PACK:
        # Rows are (head in group, query) pairs of one KV head: decode reads K/V once per group.
        b = pid_bh // Hkv
        hk = pid_bh % Hkv
        i = rows % Sq
        head = hk * G + rows // Sq
        row_ok = rows < G * Sq
        i_min = 0
        i_max = Sq - 1
    else:
        b = pid_bh // Hq
        head = pid_bh % Hq
        hk = head // G
        i = rows
        row_ok = rows < Sq
        i_min = pid_m * BLOCK_M
        i_max = tl.minimum(pid_m * BLOCK_M + BLOCK_M, Sq) - 1
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    head64 = head.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)

    q_rows = b64 * sqb + head64 * sqh + i * sqm
    q = _load_2d(Q + q_rows[:, None] + offs_d[None, :], row_ok, offs_d, True, HEAD_DIM, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_INIT:
        # Continue the softmax of keys already attended elsewhere (the cascade's own-key pass):
        # normalized o0 and natural-log lse0 are the state acc = o0, l = 1, m = lse0 in base 2.
        lse0 = tl.load(LSE0 + (b64 * Hq + head64) * Sq + i, mask=row_ok, other=float("-inf"))
        seen = lse0 > float("-inf")
        o0 = _load_2d(O0 + (b64 * so0b + head64 * so0h + i * so0m)[:, None] + offs_d[None, :], row_ok,
                      offs_d, True, HEAD_DIM, BLOCK_D).to(tl.float32)
        m_i = tl.where(seen, lse0 * 1.4426950408889634, float("-inf"))
        l_i = tl.where(seen, 1.0, 0.0)
        acc = tl.where(seen[:, None], o0, 0.0)
    off = Sk - Sq
    q_pos = off + i
    KVMb = KVM + b64 * skvmb

    # 1) prompt tokens: shared by the batch (spkb == 0) or per sample; always visible.
    acc, l_i, m_i = _fwd_prompts(
        acc, l_i, m_i, q, PK + b64 * spkb + hk64 * spkh, PV + b64 * spvb + hk64 * spvh, spkp, spvp,
        P, LW + b64 * slwb, L, offs_d, qk_scale,
        not EVEN_P, HEAD_DIM, BLOCK_D, BLOCK_N, IEEE, UPCAST)

    # 2) own keys: [0, mid) is visible to every row of the block (no causal or bounds mask),
    #    [mid, hi) straddles the diagonal or the end of the sequence.
    if IS_CAUSAL:
        hi = tl.minimum(Sk, off + i_max + 1)
        mid = (off + i_min) // BLOCK_N * BLOCK_N
    else:
        hi = Sk
        mid = Sk // BLOCK_N * BLOCK_N
    Kb = K + b64 * skb + hk64 * skh
    Vb = V + b64 * svb + hk64 * svh
    acc, l_i, m_i = _fwd_own(
        acc, l_i, m_i, q, Kb, Vb, skn, svn, 0, mid, Sk, q_pos, offs_d, KVMb, qk_scale,
        False, False, HAS_KVM, HEAD_DIM, BLOCK_D, BLOCK_N, IEEE, UPCAST)
    acc, l_i, m_i = _fwd_own(
        acc, l_i, m_i, q, Kb, Vb, skn, svn, mid, hi, Sk, q_pos, offs_d, KVMb, qk_scale,
        IS_CAUSAL, True, HAS_KVM, HEAD_DIM, BLOCK_D, BLOCK_N, IEEE, UPCAST)

    # A row that sees nothing (every expert dropped and every own key hidden) gets o = 0, lse = -inf;
    # so does a query at a padded position (RVM: its row bias -inf; the contract in
    # gated_prefix_attention.py).
    empty = l_i == 0.0
    if HAS_RVM:
        empty = empty | (tl.load(RVM + b64 * srvmb + i, mask=row_ok, other=0.0) < 0.0)
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    if HAS_RVM:
        o = tl.where(empty[:, None], 0.0, o)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    o_rows = b64 * sob + head64 * soh + i * som
    _store_2d(O + o_rows[:, None] + offs_d[None, :], o.to(O.dtype.element_ty), row_ok, offs_d,
              HEAD_DIM, BLOCK_D)
    tl.store(LSE + (b64 * Hq + head64) * Sq + i, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["Hq", "Sq"])
def _bwd_preprocess_kernel(
    O, DO, DLSE, DELTA, sob, soh, som, sdob, sdoh, sdom, Hq, Sq,
    HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Sq
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_2d(O + (b * sob + h * soh + rows * som)[:, None] + offs_d[None, :], row_ok, offs_d,
                 True, HEAD_DIM, BLOCK_D).to(tl.float32)
    do = _load_2d(DO + (b * sdob + h * sdoh + rows * sdom)[:, None] + offs_d[None, :], row_ok, offs_d,
                  True, HEAD_DIM, BLOCK_D).to(tl.float32)
    delta = tl.sum(o * do, 1)
    # A gradient on lse enters dS as +dlse * P, i.e. Delta - dlse.
    if HAS_DLSE:
        delta = delta - tl.load(DLSE + pid_bh.to(tl.int64) * Sq + rows, mask=row_ok, other=0.0)
    tl.store(DELTA + pid_bh.to(tl.int64) * Sq + rows, delta, mask=row_ok)


@triton.jit
def _bwd_kv_inner(dk, dv, dlw, k, v, bias, Qh, DOh, LSEh, DELTAh, DQh, sqm, sdom, sdqm, lo, hi, Sq, off,
                  offs_n, offs_d, qk_scale, sm_scale,
                  IS_PROMPT: tl.constexpr, CAUSAL_MASK: tl.constexpr, DQ_MODE: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, IEEE: tl.constexpr,
                  UPCAST: tl.constexpr):
    # Transposed formulation: the key block is the row axis, so dK and dV accumulate as (BLOCK_N, d).
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Sq
        q = _load_2d(Qh + offs_m[:, None] * sqm + offs_d[None, :], m_ok, offs_d, True, HEAD_DIM, BLOCK_D)
        do = _load_2d(DOh + offs_m[:, None] * sdom + offs_d[None, :], m_ok, offs_d, True, HEAD_DIM,
                      BLOCK_D)
        lse = tl.load(LSEh + offs_m, mask=m_ok, other=float("inf"))
        # lse = -inf marks a row that saw nothing: +inf makes its P exactly 0.
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(DELTAh + offs_m, mask=m_ok, other=0.0)
        sT = _dot(k, tl.trans(q), IEEE, UPCAST) * qk_scale + bias[:, None]
        if CAUSAL_MASK:
            sT = tl.where(offs_n[:, None] <= off + offs_m[None, :], sT, float("-inf"))
        pT = tl.exp2(sT - lse[None, :])
        dv += _dot(pT.to(do.dtype), do, IEEE, UPCAST)
        dpT = _dot(v, tl.trans(do), IEEE, UPCAST)
        dsT = pT * (dpT - delta[None, :])
        if IS_PROMPT:
            dlw += tl.sum(dsT, 1)
        dk += _dot(dsT.to(q.dtype), q, IEEE, UPCAST)
        if DQ_MODE != 0:
            # This key block's share of dQ. (The transposed product K^T dS^T spilled more on sm_90 at
            # d = 128.) 1: added into the fp32 accumulator with atomics; 2: this program owns the rows
            # (the cascade's prompt pass with one prompt block), so a plain read-add-write into dq.
            dq = _dot(tl.trans(dsT.to(k.dtype)), k, IEEE, UPCAST) * sm_scale
            qmask = m_ok[:, None]
            if HEAD_DIM != BLOCK_D:
                qmask = qmask & (offs_d[None, :] < HEAD_DIM)
            dq_ptrs = DQh + offs_m[:, None] * sdqm + offs_d[None, :]
            if DQ_MODE == 1:
                tl.atomic_add(dq_ptrs, dq, mask=qmask, sem="relaxed")
            else:
                dq += tl.load(dq_ptrs, mask=qmask, other=0.0).to(tl.float32)
                tl.store(dq_ptrs, dq.to(DQh.dtype.element_ty), mask=qmask)
    return dk, dv, dlw


@triton.jit(do_not_specialize=["Hq", "Hkv", "G", "Sq", "Sk", "P", "L", "NPB"])
def _gpa_bwd_dkdv_kernel(
    Q, K, V, PK, PV, LW, KVM, DO, LSE, DELTA, DK, DV, DPK, DPV, DLW, DQA,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
    spkb, spkp, spkh, spvb, spvp, spvh,
    slwb, skvmb, sdob, sdoh, sdom,
    sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    sdpb, sdpp, sdph, sdqb, sdqh, sdqm,
    Hq, Hkv, G, Sq, Sk, P, L, NPB, sm_scale, qk_scale,
    IS_CAUSAL: tl.constexpr, HAS_KVM: tl.constexpr, EVEN_P: tl.constexpr, DQ_MODE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    off = Sk - Sq
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dlw = tl.zeros([BLOCK_N], tl.float32)
    if pid_n < NPB:
        # Prompt block: seen by every query of every query head of the group.
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < P
        bias = _key_bias(KVM, LW + b64 * slwb, offs_n, n_ok, L, True, False, not EVEN_P)
        active = tl.max(bias, 0) > float("-inf")
        k = _load_2d(PK + b64 * spkb + hk64 * spkh + offs_n[:, None] * spkp + offs_d[None, :], n_ok,
                     offs_d, not EVEN_P, HEAD_DIM, BLOCK_D)
        v = _load_2d(PV + b64 * spvb + hk64 * spvh + offs_n[:, None] * spvp + offs_d[None, :], n_ok,
                     offs_d, not EVEN_P, HEAD_DIM, BLOCK_D)
        m_hi = tl.where(active, Sq, 0)  # all experts of the block dropped: nothing to do
        # Grid axis 2 splits the group's heads between programs (the cascade's prompt-only backward,
        # whose few prompt blocks alone would not fill the chip); 1 otherwise.
        for g in range(tl.program_id(2), G, tl.num_programs(2)):
            head64 = hk64 * G + g
            dk, dv, dlw = _bwd_kv_inner(
                dk, dv, dlw, k, v, bias,
                Q + b64 * sqb + head64 * sqh, DO + b64 * sdob + head64 * sdoh,
                LSE + (b64 * Hq + head64) * Sq, DELTA + (b64 * Hq + head64) * Sq,
                DQA + b64 * sdqb + head64 * sdqh, sqm, sdom, sdqm,
                0, m_hi, Sq, off, offs_n, offs_d, qk_scale, sm_scale,
                True, False, DQ_MODE, HEAD_DIM, BLOCK_D, BLOCK_M, IEEE, UPCAST)
        dk = dk * sm_scale
        # Sum over the batch with fp32 atomics (B-way contention per element); per-sample prompts
        # (sdpb != 0) land in their own slice.
        dp_rows = b64 * sdpb + offs_n * sdpp + hk64 * sdph
        amask = (offs_n < tl.where(active, P, 0))[:, None]  # no atomics for a skipped block
        if HEAD_DIM != BLOCK_D:
            amask = amask & (offs_d[None, :] < HEAD_DIM)
        tl.atomic_add(DPK + dp_rows[:, None] + offs_d[None, :], dk, mask=amask, sem="relaxed")
        tl.atomic_add(DPV + dp_rows[:, None] + offs_d[None, :], dv, mask=amask, sem="relaxed")
        tl.atomic_add(DLW + (b64 * Hkv + hk64) * P + offs_n, dlw, mask=n_ok, sem="relaxed")
    else:
        start_n = (pid_n - NPB) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Sk
        KVMb = KVM + b64 * skvmb
        bias = _key_bias(KVMb, LW, offs_n, n_ok, L, False, HAS_KVM, True)
        k = _load_2d(K + b64 * skb + hk64 * skh + offs_n[:, None] * skn + offs_d[None, :], n_ok,
                     offs_d, True, HEAD_DIM, BLOCK_D)
        v = _load_2d(V + b64 * svb + hk64 * svh + offs_n[:, None] * svn + offs_d[None, :], n_ok,
                     offs_d, True, HEAD_DIM, BLOCK_D)
        if IS_CAUSAL:
            # Queries i see key j iff j <= off + i: first query block touching the key block, and
            # first one that sees all of it (no mask needed from there on).
            m_lo = tl.maximum(start_n - off, 0) // BLOCK_M * BLOCK_M
            m_full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - off, 0), BLOCK_M) * BLOCK_M
            m_mid = tl.minimum(m_full, Sq)
        else:
            m_lo = 0
            m_full = 0
            m_mid = 0
        # A key block of padding only contributes nothing (left padding): skip its loops.
        any_key = tl.max(bias, 0) > float("-inf")
        m_hi = tl.where(any_key, Sq, 0)
        m_mid = tl.where(any_key, m_mid, 0)
        for g in range(0, G):
            head64 = hk64 * G + g
            Qh = Q + b64 * sqb + head64 * sqh
            DOh = DO + b64 * sdob + head64 * sdoh
            LSEh = LSE + (b64 * Hq + head64) * Sq
            DELTAh = DELTA + (b64 * Hq + head64) * Sq
            DQh = DQA + b64 * sdqb + head64 * sdqh
            dk, dv, dlw = _bwd_kv_inner(
                dk, dv, dlw, k, v, bias, Qh, DOh, LSEh, DELTAh, DQh, sqm, sdom, sdqm,
                m_lo, m_mid, Sq, off, offs_n, offs_d, qk_scale, sm_scale,
                False, IS_CAUSAL, DQ_MODE % 2, HEAD_DIM, BLOCK_D, BLOCK_M, IEEE, UPCAST)
            dk, dv, dlw = _bwd_kv_inner(
                dk, dv, dlw, k, v, bias, Qh, DOh, LSEh, DELTAh, DQh, sqm, sdom, sdqm,
                m_full, m_hi, Sq, off, offs_n, offs_d, qk_scale, sm_scale,
                False, False, DQ_MODE % 2, HEAD_DIM, BLOCK_D, BLOCK_M, IEEE, UPCAST)
        dk = dk * sm_scale
        _store_2d(DK + b64 * sdkb + hk64 * sdkh + offs_n[:, None] * sdkn + offs_d[None, :],
                  dk.to(DK.dtype.element_ty), n_ok, offs_d, HEAD_DIM, BLOCK_D)
        _store_2d(DV + b64 * sdvb + hk64 * sdvh + offs_n[:, None] * sdvn + offs_d[None, :],
                  dv.to(DV.dtype.element_ty), n_ok, offs_d, HEAD_DIM, BLOCK_D)


@triton.jit
def _bwd_q_step(dq, q, do, lse, delta, k, v, s, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    p = tl.exp2(s - lse[:, None])
    dp = _dot(do, tl.trans(v), IEEE, UPCAST)
    ds = p * (dp - delta[:, None])
    dq += _dot(ds.to(k.dtype), k, IEEE, UPCAST)
    return dq


@triton.jit
def _bwd_q_prompts(dq, q, do, lse, delta, Kb, Vb, stride_kn, stride_vn, P, LWb, L, offs_d, qk_scale,
                   BOUND: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    for start_n in tl.range(0, P, BLOCK_N, num_stages=1):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < P
        bias = _key_bias(LWb, LWb, offs_n, n_ok, L, True, False, BOUND)
        if tl.max(bias, 0) > float("-inf"):  # every expert of the tile dropped: skip
            k = _load_2d(Kb + offs_n[:, None] * stride_kn + offs_d[None, :], n_ok, offs_d, BOUND,
                         HEAD_DIM, BLOCK_D)
            v = _load_2d(Vb + offs_n[:, None] * stride_vn + offs_d[None, :], n_ok, offs_d, BOUND,
                         HEAD_DIM, BLOCK_D)
            s = _dot(q, tl.trans(k), IEEE, UPCAST) * qk_scale + bias[None, :]
            dq = _bwd_q_step(dq, q, do, lse, delta, k, v, s, IEEE, UPCAST)
    return dq


@triton.jit
def _bwd_q_own(dq, q, do, lse, delta, Kb, Vb, stride_kn, stride_vn, lo, hi, N, q_pos, offs_d, KVM,
               qk_scale, CAUSAL_MASK: tl.constexpr, BOUND: tl.constexpr, HAS_KVM: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               IEEE: tl.constexpr, UPCAST: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        k = _load_2d(Kb + offs_n[:, None] * stride_kn + offs_d[None, :], n_ok, offs_d, BOUND,
                     HEAD_DIM, BLOCK_D)
        v = _load_2d(Vb + offs_n[:, None] * stride_vn + offs_d[None, :], n_ok, offs_d, BOUND,
                     HEAD_DIM, BLOCK_D)
        s = _dot(q, tl.trans(k), IEEE, UPCAST) * qk_scale
        if HAS_KVM or BOUND:
            s = s + _key_bias(KVM, KVM, offs_n, n_ok, 1, False, HAS_KVM, BOUND)[None, :]
        if CAUSAL_MASK:
            s = tl.where(offs_n[None, :] <= q_pos[:, None], s, float("-inf"))
        dq = _bwd_q_step(dq, q, do, lse, delta, k, v, s, IEEE, UPCAST)
    return dq


@triton.jit(do_not_specialize=["Hq", "Hkv", "G", "Sq", "Sk", "P", "L"])
def _gpa_bwd_dq_kernel(
    Q, K, V, PK, PV, LW, KVM, DO, LSE, DELTA, DQ,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
    spkb, spkp, spkh, spvb, spvp, spvh,
    slwb, skvmb, sdob, sdoh, sdom, sdqb, sdqh, sdqm,
    Hq, Hkv, G, Sq, Sk, P, L, sm_scale, qk_scale,
    IS_CAUSAL: tl.constexpr, HAS_KVM: tl.constexpr, EVEN_P: tl.constexpr, ACCUM_DQ: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = pid_bh // Hq
    head = pid_bh % Hq
    hk = head // G
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    head64 = head.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Sq
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_2d(Q + b64 * sqb + head64 * sqh + offs_m[:, None] * sqm + offs_d[None, :], m_ok, offs_d,
                 True, HEAD_DIM, BLOCK_D)
    do = _load_2d(DO + b64 * sdob + head64 * sdoh + offs_m[:, None] * sdom + offs_d[None, :], m_ok,
                  offs_d, True, HEAD_DIM, BLOCK_D)
    row = (b64 * Hq + head64) * Sq + offs_m
    lse = tl.load(LSE + row, mask=m_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + row, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    off = Sk - Sq
    q_pos = off + offs_m
    KVMb = KVM + b64 * skvmb

    dq = _bwd_q_prompts(
        dq, q, do, lse, delta, PK + b64 * spkb + hk64 * spkh, PV + b64 * spvb + hk64 * spvh, spkp, spvp,
        P, LW + b64 * slwb, L, offs_d, qk_scale,
        not EVEN_P, HEAD_DIM, BLOCK_D, BLOCK_N, IEEE, UPCAST)
    if IS_CAUSAL:
        hi = tl.minimum(Sk, off + tl.minimum(pid_m * BLOCK_M + BLOCK_M, Sq))
        mid = (off + pid_m * BLOCK_M) // BLOCK_N * BLOCK_N
    else:
        hi = Sk
        mid = Sk // BLOCK_N * BLOCK_N
    Kb = K + b64 * skb + hk64 * skh
    Vb = V + b64 * svb + hk64 * svh
    dq = _bwd_q_own(
        dq, q, do, lse, delta, Kb, Vb, skn, svn, 0, mid, Sk, q_pos, offs_d, KVMb, qk_scale,
        False, False, HAS_KVM, HEAD_DIM, BLOCK_D, BLOCK_N, IEEE, UPCAST)
    dq = _bwd_q_own(
        dq, q, do, lse, delta, Kb, Vb, skn, svn, mid, hi, Sk, q_pos, offs_d, KVMb, qk_scale,
        IS_CAUSAL, True, HAS_KVM, HEAD_DIM, BLOCK_D, BLOCK_N, IEEE, UPCAST)
    dq = dq * sm_scale
    dq_ptrs = DQ + b64 * sdqb + head64 * sdqh + offs_m[:, None] * sdqm + offs_d[None, :]
    if ACCUM_DQ:  # add to the dq already there (the cascade's own-key share); each row has one program
        dq += _load_2d(dq_ptrs, m_ok, offs_d, True, HEAD_DIM, BLOCK_D).to(tl.float32)
    _store_2d(dq_ptrs, dq.to(DQ.dtype.element_ty), m_ok, offs_d, HEAD_DIM, BLOCK_D)


# --------------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------------
# The kernels are decorated once, at import: under TRITON_INTERPRET=1 they are interpreted.
INTERPRETED = type(_gpa_fwd_kernel).__name__ == "InterpretedFunction"

# (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M is the query tile, BLOCK_N the key tile, in every
# kernel (in dK/dV the key tile is the program's fixed block and queries stream). See docs/kernels.md.
# Chosen so that nothing spills to local memory (sm_90 compile reports, docs/kernels.md).
_SM90 = {  # H100 / H200 (and sm_100): 227 KB shared memory per block, wgmma
    "fwd": {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 8, 2)},
    "dkdv": {64: (32, 128, 8, 2), 128: (16, 128, 8, 2), 256: (32, 32, 8, 1)},
    "dq": {64: (128, 64, 8, 2), 128: (128, 64, 8, 2), 256: (32, 32, 8, 1)},
    # The cascade's prompt-only forward (memory-bound: q and o0 in, o out): small tiles keep more
    # programs resident. d = 128 measured on an H100 (1.153 ms the cascade's forward against 1.241 with
    # the fwd tile, 2026-11-27); the other head dims take the fwd tile (_BASE_KIND).
    "fwd_init": {128: (64, 64, 4, 1)},
}
# dK/dV when it also adds dQ (dq_mode "atomic"): the extra product and the atomics' addresses need
# registers, and at d = 128 every tile with 128 keys spilled on sm_90 (160-240 bytes), so 64 keys.
_SM90["dkdv_atomic"] = {64: (32, 128, 8, 2), 128: (16, 64, 8, 2), 256: (16, 32, 8, 1)}
_SM80 = {**_SM90, "dq": {64: (128, 32, 8, 2), 128: (128, 32, 8, 2), 256: (32, 32, 8, 1)},  # A100: mma.sync
         "dkdv_atomic": {64: (16, 128, 8, 2), 128: (16, 64, 8, 2), 256: (16, 16, 8, 1)}}
# The cascade's prompt-only dK/dV pass (no own keys; with cascade_dq "fused" it also adds dQ): a wider
# query tile than the fused backward's. H100, main shape, 2026-11-27: the cascade's backward 3.83 ms with
# (32, 128, 8, 2), 3.86 with (16, 128, 8, 3), 4.03 with the dkdv tile (16, 128, 8, 2), 4.91 with
# (16, 128, 4, 2). Set after _SM80 copies _SM90: untimed on an A100, which keeps the dkdv tile.
_SM90["dkdv_prompt"] = {128: (32, 128, 8, 2)}
_SMALL_SMEM = {  # consumer parts (~100 KB shared memory per block), fp16 / bf16 operands
    "fwd": {64: (128, 64, 4, 2), 128: (64, 64, 4, 2), 256: (64, 32, 4, 1)},
    "dkdv": {64: (32, 64, 4, 2), 128: (32, 64, 8, 1), 256: (32, 32, 8, 1)},
    "dq": {64: (64, 64, 4, 2), 128: (64, 64, 4, 1), 256: (32, 32, 8, 1)},
    "dkdv_atomic": {64: (16, 64, 4, 2), 128: (32, 64, 8, 1), 256: (16, 16, 8, 1)},
}
_FP32 = {  # IEEE fp32 dots run on the FMA units: small tiles keep the operands in registers
    "fwd": {64: (32, 32, 8, 1), 128: (32, 32, 8, 1), 256: (16, 16, 8, 1)},
    "dkdv": {64: (32, 16, 8, 1), 128: (32, 16, 8, 1), 256: (16, 16, 8, 1)},
    "dq": {64: (32, 16, 8, 1), 128: (32, 16, 8, 1), 256: (16, 16, 8, 1)},
}
_INTERP = {"fwd": (16, 16, 4, 1), "dkdv": (16, 16, 4, 1), "dq": (16, 16, 4, 1)}
_OVERRIDE: dict = {}

# How the backward computes dQ (docs/kernels.md, "Backward"):
#   "split"   its own kernel, which recomputes S and dP per tile (7 block products in all); deterministic.
#   "atomic"  the dK/dV programs also form each key block's share of dQ and add it into an fp32 buffer
#             with atomics (5 block products, as FlashAttention-2 does; the summation order varies).
# Default "split" until a GPU run shows "atomic" faster; torch.use_deterministic_algorithms(True)
# always gets "split". MOPS_FAST_GPA_DQ or override_configs(dq_mode=...) choose.
DQ_MODES = ("split", "atomic")
DEFAULT_DQ_MODE = "split"
# dQ of the cascade's prompt-only backward (prefix_cascade.py): "kernel", the dQ kernel adding into
# FlashAttention's dq; "fused", the dK/dV programs add it where one prompt block holds every prompt
# (J*L <= BLOCK_N), saving the dQ kernel's S and dP products and its pass over q and do. Measured on an
# H100 (bf16, B=8 Hq=32 Hkv=8 d=128 J*L=128, 2026-11-27): the cascade's backward 3.98 vs 4.11 ms at
# S = 2048, 11.79 vs 12.10 at 4096, 0.90 vs 1.03 at 512; a tie at J*L = 512 (two prompt blocks: the
# dQ kernel runs either way). MOPS_FAST_GPA_CASCADE_DQ or override_configs(cascade_dq=...).
CASCADE_DQ_MODES = ("kernel", "fused")
DEFAULT_CASCADE_DQ = "fused"
_MODE_KEYS = ("dq_mode", "cascade", "cascade_dq")  # override_configs keys that are not tiles


@contextmanager
def override_configs(**cfgs):
    """Force (BLOCK_M, BLOCK_N, num_warps, num_stages) for 'fwd', 'fwd_pack', 'fwd_init' (the cascade's
    forward prompt pass), 'dkdv', 'dkdv_prompt' (the cascade's backward prompt pass; a 'dkdv' override
    holds for it too) and/or 'dq', the
    backward's dQ strategy with dq_mode='split' | 'atomic', and the shared-prefix cascade of
    prefix_cascade.py with cascade=True | False | 'bwd' | 'auto' and cascade_dq='kernel' | 'fused' for its
    prompt-only backward (tests use it to put block edges in awkward
    places and to cover every strategy; benchmarks to sweep)."""
    unknown = set(cfgs) - {"fwd", "fwd_pack", "fwd_init", "dkdv", "dkdv_prompt", "dq", *_MODE_KEYS}
    if unknown:
        raise ValueError(f"override_configs: unknown kernels {sorted(unknown)}")
    if "dq_mode" in cfgs and cfgs["dq_mode"] not in DQ_MODES:
        raise ValueError(f"override_configs: dq_mode must be one of {DQ_MODES}, got {cfgs['dq_mode']!r}")
    if "cascade_dq" in cfgs and cfgs["cascade_dq"] not in CASCADE_DQ_MODES:
        raise ValueError(f"override_configs: cascade_dq must be one of {CASCADE_DQ_MODES}, got {cfgs['cascade_dq']!r}")
    if "cascade" in cfgs and cfgs["cascade"] not in (True, False, "auto", "bwd", "0", "1"):
        raise ValueError(f"override_configs: cascade must be True, False, 'auto' or 'bwd', got {cfgs['cascade']!r}")
    old = dict(_OVERRIDE)
    _OVERRIDE.update(cfgs)
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(old)


def _env_override():
    # MOPS_FAST_GPA_CONFIG="fwd=128,64,8,3;dkdv=16,128,8,2;dq=128,64,8,2" (for tuning on a GPU).
    spec = os.environ.get("MOPS_FAST_GPA_CONFIG", "").strip()
    out = {}
    if spec:
        for part in spec.split(";"):
            name, _, vals = part.partition("=")
            out[name.strip()] = tuple(int(x) for x in vals.split(","))
    return out


def _dq_mode() -> str:
    mode = _OVERRIDE.get("dq_mode") or os.environ.get("MOPS_FAST_GPA_DQ", "").strip() or DEFAULT_DQ_MODE
    if mode not in DQ_MODES:
        raise ValueError(f"MOPS_FAST_GPA_DQ={mode!r}: use one of {DQ_MODES}")
    if mode == "atomic" and torch.are_deterministic_algorithms_enabled():
        return "split"  # atomics change the summation order from run to run
    return mode


def _cascade_dq() -> str:
    mode = (_OVERRIDE.get("cascade_dq") or os.environ.get("MOPS_FAST_GPA_CASCADE_DQ", "").strip()
            or DEFAULT_CASCADE_DQ)
    if mode not in CASCADE_DQ_MODES:
        raise ValueError(f"MOPS_FAST_GPA_CASCADE_DQ={mode!r}: use one of {CASCADE_DQ_MODES}")
    return mode


_ARCH: dict = {}


def _arch(device) -> str:
    # asked on every launch (each attention layer, each decode step): the capability query costs
    # microseconds of host time and never changes for a device (a tensor's device names its index; one
    # without, "the current device", is asked each time)
    arch = _ARCH.get(device)
    if arch is None:
        cap = torch.cuda.get_device_capability(device)
        arch = "sm90" if cap in ((9, 0), (10, 0)) else ("sm80" if cap == (8, 0) else "small")
        if getattr(device, "index", None) is not None:
            _ARCH[device] = arch
    return arch


# Kinds whose tile, where their own table has none, is that of another kind.
_BASE_KIND = {"fwd_pack": "fwd", "fwd_init": "fwd", "dkdv_prompt": "dkdv"}


def _config(kind: str, dtype: torch.dtype, block_d: int, device, pack_rows: int = 0, atomic_dq: bool = False):
    overrides = {**_env_override(), **{k: v for k, v in _OVERRIDE.items() if k not in _MODE_KEYS}}
    cfg = overrides.get(kind)
    if cfg is None and kind == "dkdv_prompt":
        cfg = overrides.get("dkdv")
    if cfg is None and INTERPRETED:
        cfg = _INTERP[_BASE_KIND.get(kind, kind)]
    if cfg is None:
        dkey = 64 if block_d <= 64 else (128 if block_d <= 128 else 256)
        arch = _arch(device)
        big = arch != "small"
        if kind == "fwd_pack":
            # Decode: one tile holds the group's G * Sq query rows (<= 64); keys stream in tiles of 64
            # (32 for fp32 or d = 256), so one K/V read serves every query head of the group.
            bm = min(64, max(16, _next_pow2(pack_rows)))
            bn = 32 if (dtype == torch.float32 or dkey == 256) else 64
            cfg = (bm, bn, 4, 3 if big else 2)
        else:
            table = _FP32 if dtype == torch.float32 else {"sm90": _SM90, "sm80": _SM80}.get(arch, _SMALL_SMEM)
            if kind == "dkdv" and atomic_dq and "dkdv_atomic" in table:
                kind = "dkdv_atomic"
            cfg = table.get(kind, {}).get(dkey) or table[_BASE_KIND.get(kind, kind)][dkey]
    bm, bn, warps, stages = cfg
    if bm < 16 or bn < 16 or bm & (bm - 1) or bn & (bn - 1):
        raise ValueError(f"gated_prefix_attention: block sizes must be powers of two >= 16, got {cfg}")
    return bm, bn, warps, stages


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------
# Host-side arithmetic in plain Python: triton.cdiv and next_power_of_2 are jit functions in recent
# Triton versions, whose host calls cost microseconds each on the launch path.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _last_dim_contig(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_device(q):
    if not q.is_cuda and not INTERPRETED:
        raise ValueError("gated_prefix_attention (Triton): CPU tensors run the kernels only under "
                         "TRITON_INTERPRET=1 (set before this module is imported); use the reference")


def _prepare(q, k, v, prompt_k, prompt_v, gate_logw, key_valid, query_valid=None, causal=True):
    """Shared argument preparation: dtype/layout normalization, the flat prompt views, and the masks:
    key padding (kvm) and the queries at padded positions (qv, rvm; from key_valid unless query_valid
    is given, as the cascade and a right-padded batch do without a key mask)."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"gated_prefix_attention (Triton): dtype {q.dtype} not supported; use fp16, "
                         "bf16 or fp32 (float64 goes through the reference)")
    _check_device(q)
    d = q.shape[-1]
    if d > MAX_HEAD_DIM:
        raise ValueError(f"gated_prefix_attention (Triton): head dim {d} > {MAX_HEAD_DIM} not supported")
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    per_sample = prompt_k.dim() == 5
    J, L = prompt_k.shape[-4], prompt_k.shape[-3]
    P = J * L
    Bp = B if per_sample else 1
    # Prompts are small (J*L*Hkv*d): cast them to the compute dtype so tl.dot sees one dtype.
    pk = _last_dim_contig(prompt_k.to(q.dtype)).reshape(Bp, P, Hkv, d)
    pv = _last_dim_contig(prompt_v.to(q.dtype)).reshape(Bp, P, Hkv, d)
    if gate_logw is None:
        lw = torch.zeros((B, J), device=q.device, dtype=torch.float32)
    else:
        lw = gate_logw.detach().to(torch.float32).contiguous()
    kvm = None
    if key_valid is not None:
        # An additive fp32 bias (0 / -inf) rather than bytes: it pipelines through shared memory like
        # the K/V tiles (a byte mask cost ~70 registers per thread in the forward on sm_90).
        kvm = torch.where(key_valid, 0.0, float("-inf")).float()  # one kernel; .float() is a no-op
    qv, rvm = query_valid, None
    if qv is None and key_valid is not None:
        qv = gpa_query_valid(key_valid, Sq, Sk, causal)
        rvm = kvm[:, Sk - Sq:] if qv is not None else None  # a view: no kernel
    elif qv is not None:
        if tuple(qv.shape) != (B, Sq) or qv.dtype != torch.bool:
            raise ValueError(f"gated_prefix_attention: query_valid must be ({B}, {Sq}) bool")
        rvm = torch.where(qv, 0.0, float("-inf")).float()
    return dict(
        q=_last_dim_contig(q), k=_last_dim_contig(k), v=_last_dim_contig(v), pk=pk, pv=pv, lw=lw,
        kvm=kvm, qv=qv, rvm=rvm, B=B, Hq=Hq, Hkv=Hkv, G=Hq // Hkv, Sq=Sq, Sk=Sk, d=d, J=J, L=L, P=P, Bp=Bp,
        per_sample=per_sample, block_d=max(16, _next_pow2(d)),
    )


def _flags(dtype):
    ieee = dtype == torch.float32 and (INTERPRETED or not torch.backends.cuda.matmul.allow_tf32)
    upcast = INTERPRETED and dtype == torch.bfloat16
    return ieee, upcast


def _prompt_strides(t, per_sample):
    return (t.stride(0) if per_sample else 0), t.stride(1), t.stride(2)


_RESOLVED: dict = {}


def _fallbacks(cfg):
    bm, bn, w, st = cfg
    out = [cfg, (bm, bn, w, 1), (bm, max(16, bn // 2), w, 1), (max(16, bm // 2), max(16, bn // 2), 4, 1)]
    return list(dict.fromkeys(out))


def _launch(kind, key, cfg, launch):
    """launch(cfg); if the compiled tile does not fit the chip (shared memory), retry with smaller
    ones and remember what worked for this key. A safety net: the tables should fit as they are."""
    rk = (kind, key, cfg)
    if rk in _RESOLVED:
        return launch(_RESOLVED[rk])
    cands = _fallbacks(cfg)
    for n, c in enumerate(cands):
        try:
            out = launch(c)
        except OutOfResources as e:
            if n == len(cands) - 1:
                raise
            warnings.warn(f"gated_prefix_attention: {kind} config {c} does not fit ({e}); trying "
                          f"{cands[n + 1]}", RuntimeWarning, stacklevel=3)
            continue
        _RESOLVED[rk] = c
        return out


def gpa_forward(q, k, v, prompt_k, prompt_v, gate_logw, key_valid, scale: float, causal: bool,
                init=None, query_valid=None):
    """Fused forward: returns (o (B, Hq, Sq, d) in q's dtype, lse (B, Hq, Sq) float32).

    Queries at padded positions (query_valid (B, Sq) False, by default from key_valid when causal) get
    o = 0 and lse = -inf (the contract in gated_prefix_attention.py).

    init=(o0, lse0): continue from the softmax state of keys attended elsewhere (o0 normalized, lse0
    natural log, rows with lse0 = -inf saw nothing), as the shared-prefix cascade does (prefix_cascade.py)."""
    a = _prepare(q, k, v, prompt_k, prompt_v, gate_logw, key_valid, query_valid, causal)
    B, Hq, Hkv, G, Sq, Sk, d = a["B"], a["Hq"], a["Hkv"], a["G"], a["Sq"], a["Sk"], a["d"]
    o = torch.empty((B, Hq, Sq, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, Hq, Sq), device=q.device, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse
    q_, k_, v_, pk, pv, kvm, rvm = a["q"], a["k"], a["v"], a["pk"], a["pv"], a["kvm"], a["rvm"]
    pack = G * Sq <= 64
    kind = "fwd_pack" if pack else ("fwd_init" if init is not None else "fwd")
    ieee, upcast = _flags(q.dtype)
    if init is not None:
        o0, lse0 = _last_dim_contig(init[0]), init[1].contiguous()
        if o0.shape != o.shape or lse0.shape != lse.shape or lse0.dtype != torch.float32:
            raise ValueError(f"gated_prefix_attention: init state o0 {tuple(o0.shape)} / lse0 "
                             f"{tuple(lse0.shape)} {lse0.dtype} must be {tuple(o.shape)} / {tuple(lse.shape)} "
                             "float32")
    else:
        o0, lse0 = o, lse

    def launch(cfg):
        bm, bn, warps, stages = cfg
        grid = (B * Hkv, _cdiv(G * Sq, bm)) if pack else (B * Hq, _cdiv(Sq, bm))
        _gpa_fwd_kernel[grid](
            q_, k_, v_, pk, pv, a["lw"], kvm if kvm is not None else a["lw"],
            rvm if rvm is not None else a["lw"], o, lse, o0, lse0,
            q_.stride(0), q_.stride(1), q_.stride(2), k_.stride(0), k_.stride(1), k_.stride(2),
            v_.stride(0), v_.stride(1), v_.stride(2),
            *_prompt_strides(pk, a["per_sample"]), *_prompt_strides(pv, a["per_sample"]),
            a["lw"].stride(0), kvm.stride(0) if kvm is not None else 0, rvm.stride(0) if rvm is not None else 0,
            o.stride(0), o.stride(1), o.stride(2), o0.stride(0), o0.stride(1), o0.stride(2),
            Hq, Hkv, G, Sq, Sk, a["P"], a["L"], scale * LOG2E,
            IS_CAUSAL=causal, HAS_KVM=kvm is not None, HAS_RVM=rvm is not None, PACK=pack,
            EVEN_P=a["P"] % bn == 0, HAS_INIT=init is not None,
            HEAD_DIM=d, BLOCK_D=a["block_d"], BLOCK_M=bm, BLOCK_N=bn, IEEE=ieee, UPCAST=upcast,
            num_warps=warps, num_stages=stages,
        )

    cfg = _config(kind, q.dtype, a["block_d"], q.device, G * Sq)
    _launch(kind, (q.dtype, d, causal, kvm is not None, rvm is not None, init is not None), cfg, launch)
    return o, lse


def hide_rows(lse, query_valid):
    """lse with +inf at queries of padded positions: a backward then gives those rows probabilities
    exp(s - inf) = 0, so they add to no gradient (FlashAttention's backward included) and get dq = 0."""
    return lse if query_valid is None else lse.masked_fill(~query_valid[:, None, :], float("inf"))


def gpa_backward(do, dlse, q, k, v, prompt_k, prompt_v, gate_logw, key_valid, o, lse, scale: float,
                 causal: bool, dq_init=None, query_valid=None):
    """Fused backward: returns (dq, dk, dv, d prompt_k, d prompt_v, d gate_logw (B, J) float32).

    Prompt gradients are summed over the batch (shared prompts) or kept per sample (5-D prompts),
    in the prompts' own dtype and shape. dq_init (B, Hq, Sq, d): dq is added to it in place and it is
    returned as dq (the cascade's own-key share); dQ is then computed by its own kernel ("split").
    Queries at padded positions (query_valid, by default from key_valid when causal) pass no gradient."""
    a = _prepare(q, k, v, prompt_k, prompt_v, gate_logw, key_valid, query_valid, causal)
    B, Hq, Hkv, G, Sq, Sk, d = a["B"], a["Hq"], a["Hkv"], a["G"], a["Sq"], a["Sk"], a["d"]
    P, L, J, Bp, bd = a["P"], a["L"], a["J"], a["Bp"], a["block_d"]
    dev = q.device
    if dq_init is not None and (dq_init.shape != q.shape or dq_init.dtype != q.dtype or dq_init.stride(-1) != 1):
        raise ValueError(f"gated_prefix_attention: dq_init {tuple(dq_init.shape)} {dq_init.dtype} must have "
                         f"q's shape {tuple(q.shape)} and dtype {q.dtype} with a contiguous last dim")
    dq = dq_init if dq_init is not None else torch.empty((B, Hq, Sq, d), device=dev, dtype=q.dtype)
    dk = torch.empty((B, Hkv, Sk, d), device=dev, dtype=k.dtype)
    dv = torch.empty((B, Hkv, Sk, d), device=dev, dtype=v.dtype)
    # fp32 accumulators shared by the batch: atomics add each sample's share (docs/kernels.md).
    dpk = torch.zeros((Bp, P, Hkv, d), device=dev, dtype=torch.float32)
    dpv = torch.zeros((Bp, P, Hkv, d), device=dev, dtype=torch.float32)
    dlw = torch.zeros((B, Hkv, P), device=dev, dtype=torch.float32)
    if dq.numel() == 0:
        dk.zero_()
        dv.zero_()
    else:
        q_, k_, v_, pk, pv, kvm = a["q"], a["k"], a["v"], a["pk"], a["pv"], a["kvm"]
        do_ = _last_dim_contig(do)
        o_ = _last_dim_contig(o)
        lse_ = hide_rows(lse, a["qv"]).contiguous()
        ieee, upcast = _flags(q.dtype)
        delta = torch.empty((B, Hq, Sq), device=dev, dtype=torch.float32)
        pre_bm = 16 if INTERPRETED else 64
        dlse_ = dlse.to(torch.float32).contiguous() if dlse is not None else delta
        _bwd_preprocess_kernel[(B * Hq, _cdiv(Sq, pre_bm))](
            o_, do_, dlse_, delta, o_.stride(0), o_.stride(1), o_.stride(2),
            do_.stride(0), do_.stride(1), do_.stride(2), Hq, Sq,
            HAS_DLSE=dlse is not None, HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=pre_bm, num_warps=4,
        )
        common = (
            q_.stride(0), q_.stride(1), q_.stride(2), k_.stride(0), k_.stride(1), k_.stride(2),
            v_.stride(0), v_.stride(1), v_.stride(2),
            *_prompt_strides(pk, a["per_sample"]), *_prompt_strides(pv, a["per_sample"]),
            a["lw"].stride(0), kvm.stride(0) if kvm is not None else 0,
            do_.stride(0), do_.stride(1), do_.stride(2),
        )
        kvm_arg = kvm if kvm is not None else a["lw"]
        key = (q.dtype, d, causal, kvm is not None)
        atomic_dq = _dq_mode() == "atomic" and dq_init is None
        # The cascade's prompt-only pass (no own keys): with one prompt block every program owns its
        # rows, so with cascade_dq "fused" the dK/dV programs add dQ themselves and the dQ kernel is skipped.
        owned_dq = dq_init is not None and Sk == 0 and _cascade_dq() == "fused"
        dq_done = [atomic_dq]
        # atomic: the fp32 accumulator the dK/dV programs add into (dq itself when q is fp32). Like the
        # prompt-gradient buffers it is zeroed once: OutOfResources is raised before a launch runs.
        dqa = dq
        if atomic_dq:
            dqa = dq.zero_() if q.dtype == torch.float32 else torch.zeros(dq.shape, device=dev,
                                                                           dtype=torch.float32)

        def launch_dkdv(cfg):
            bm, bn, warps, stages = cfg
            npb = _cdiv(P, bn)
            owner = owned_dq and npb == 1
            dq_done[0] = atomic_dq or owner
            # With no own keys (the cascade's prompt-only pass) the group's heads split over axis 2.
            _gpa_bwd_dkdv_kernel[(B * Hkv, npb + _cdiv(Sk, bn), G if Sk == 0 else 1)](
                q_, k_, v_, pk, pv, a["lw"], kvm_arg, do_, lse_, delta, dk, dv, dpk, dpv, dlw, dqa,
                *common,
                dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
                dpk.stride(0) if a["per_sample"] else 0, dpk.stride(1), dpk.stride(2),
                dqa.stride(0), dqa.stride(1), dqa.stride(2),
                Hq, Hkv, G, Sq, Sk, P, L, npb, scale, scale * LOG2E,
                IS_CAUSAL=causal, HAS_KVM=kvm is not None, EVEN_P=P % bn == 0,
                DQ_MODE=1 if atomic_dq else (2 if owner else 0),
                HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn, IEEE=ieee, UPCAST=upcast,
                num_warps=warps, num_stages=stages,
            )

        def launch_dq(cfg):
            bm, bn, warps, stages = cfg
            _gpa_bwd_dq_kernel[(B * Hq, _cdiv(Sq, bm))](
                q_, k_, v_, pk, pv, a["lw"], kvm_arg, do_, lse_, delta, dq,
                *common, dq.stride(0), dq.stride(1), dq.stride(2),
                Hq, Hkv, G, Sq, Sk, P, L, scale, scale * LOG2E,
                IS_CAUSAL=causal, HAS_KVM=kvm is not None, EVEN_P=P % bn == 0, ACCUM_DQ=dq_init is not None,
                HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn, IEEE=ieee, UPCAST=upcast,
                num_warps=warps, num_stages=stages,
            )

        dkdv_kind = "dkdv_prompt" if Sk == 0 else "dkdv"
        _launch(dkdv_kind, key + (atomic_dq, owned_dq), _config(dkdv_kind, q.dtype, bd, dev, atomic_dq=atomic_dq),
                launch_dkdv)
        if atomic_dq:
            if dqa is not dq:
                dq.copy_(dqa)
        elif not dq_done[0]:
            _launch("dq", key + (dq_init is not None,), _config("dq", q.dtype, bd, dev), launch_dq)
    dlogw = dlw.sum(1).view(B, J, L).sum(-1)
    dpk = dpk.view(prompt_k.shape).to(prompt_k.dtype)
    dpv = dpv.view(prompt_v.shape).to(prompt_v.dtype)
    return dq, dk, dv, dpk, dpv, dlogw
