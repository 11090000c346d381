"""Triton attention: flash-style forward and backward, and a split-key decode kernel.

Masks (SPEC "Causal masked attention") are evaluated per tile from indices, never
materialised: causal j ≤ i + δ (δ = 0 top-left, Lk − Lq bottom-right), sliding window
j > i + δ − w, key lengths j < ℓ_b, plus an optional explicit bool/additive mask read through
its (possibly zero, i.e. broadcast) strides. GQA: query head h reads kv head h // (Hq / Hkv).

Forward (``_attention_forward_kernel``): one program per (BLOCK_M queries, batch·query-head).
Q tile stays in registers; the loop walks only the key tiles that can hold an allowed key —
[lo, hi) from the window and causal bounds and the key length — so fully masked tiles are
never loaded. Online softmax in base 2 (scale·log2 e folded into the logits). Writes O and the
natural-log LSE (−inf for a row with no allowed key, whose output is 0).

Backward (FlashAttention-2 split): D_i = rowsum(dO ⊙ O) first; then
- ``_attention_backward_dkdv_kernel``: one program per (BLOCK_N keys, batch·kv-head); it loops
  over the query heads of its GQA group and over the query tiles that can see its keys,
  recomputing P = exp(S − LSE) and accumulating dK, dV in registers (no atomics: a kv head's
  gradient is owned by one program).
- ``_attention_backward_dq_kernel``: one program per (BLOCK_M queries, batch·query-head),
  same key-tile range as the forward, accumulating dQ.
Saved for backward: Q, K, V, O and LSE (B·Hq·Lq floats), never the Lq × Lk matrix.

Decode (``_attention_decode_kernel``): few queries against a long KV cache. The grid splits
the keys into NUM_SPLITS ranges (so a single sequence still fills the GPU), and the rows of a
tile are (query head in the GQA group × query position), so each K/V tile is read once per kv
head instead of once per query head. Each split writes an unnormalised partial (acc, max,
sum); ``_attention_decode_combine_kernel`` merges them with the usual LSE rescaling.

Block sizes: forward on CUDA autotunes over three configs (below); backward and decode use
fixed tiles. Under the interpreter every kernel uses 16/32-sized tiles (no autotuning).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from seqkern import _ext
from seqkern.triton.common import (LOG2E, check_device, dot_precision, interpreting,
                                   online_softmax_update)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward on GPUs. 64×64/4 warps suits D ≤ 64
# and short sequences, 128×64/8 warps is the Ampere/Hopper sweet spot for D = 64..128, and
# 128×32 keeps D = 256 (many registers per row) from spilling.
_FWD_CONFIGS = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 8, 2)]
_BWD_BLOCK = (64, 64, 4, 2)      # dK/dV and dQ kernels: BLOCK_M, BLOCK_N, warps, stages
_INTERP_BLOCK = 32               # interpreter tiles (numpy; bigger tiles = fewer python steps)


@triton.jit
def _allowed(offs_m, offs_n, Lq, kl, delta, window,
             IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    ok = (offs_m[:, None] < Lq) & (offs_n[None, :] < kl)
    if IS_CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + delta)
    if HAS_WINDOW:
        ok = ok & (offs_n[None, :] > offs_m[:, None] + delta - window)
    return ok


@triton.jit
def _scores(q, k_ptr, offs_n, offs_d, skn, skd, kl, D, mask_ptr, smm, smn, offs_m, ok,
            scale_log2, MASK_KIND: tl.constexpr, PREC: tl.constexpr):
    """Base-2 logits of one (M, N) tile with -inf where not allowed; also the final mask."""
    kt = tl.load(k_ptr + offs_n[None, :] * skn + offs_d[:, None] * skd,
                 mask=(offs_n[None, :] < kl) & (offs_d[:, None] < D), other=0.0)
    s = tl.dot(q, kt, input_precision=PREC) * scale_log2
    if MASK_KIND == 1:
        mv = tl.load(mask_ptr + offs_m[:, None] * smm + offs_n[None, :] * smn, mask=ok, other=0)
        ok = ok & (mv != 0)
    if MASK_KIND == 2:
        mv = tl.load(mask_ptr + offs_m[:, None] * smm + offs_n[None, :] * smn, mask=ok, other=0.0)
        s += mv.to(tl.float32) * 1.4426950408889634
    s = tl.where(ok, s, float("-inf"))
    return s, ok


@triton.jit
def _key_range(m0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, kl, delta, window,
               IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key tiles [lo, hi) that can hold an allowed key for query rows [m0, m0 + BLOCK_M)."""
    lo = 0
    hi = kl
    if IS_CAUSAL:
        hi = tl.minimum(hi, m0 + BLOCK_M + delta)
    if HAS_WINDOW:
        lo = tl.maximum(m0 + delta - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _attention_forward_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, kl_ptr, o_ptr, lse_ptr,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
        smb, smh, smm, smn, sob, soh, som, sod,
        Hq, GROUP, Lq, Lk, D, DV, scale_log2, delta, window,
        IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KL: tl.constexpr,
        MASK_KIND: tl.constexpr, PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D), other=0.0)
    kl = Lk
    if HAS_KL:
        kl = tl.minimum(tl.load(kl_ptr + b).to(tl.int32), Lk)
    k_base = k_ptr + b * skb + hk * skh
    v_base = v_ptr + b * svb + hk * svh
    m_base = mask_ptr + b * smb + h * smh
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    lo, hi = _key_range(m0, BLOCK_M, BLOCK_N, kl, delta, window, IS_CAUSAL, HAS_WINDOW)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + offs_n0
        ok = _allowed(offs_m, offs_n, Lq, kl, delta, window, IS_CAUSAL, HAS_WINDOW)
        s, ok = _scores(q, k_base, offs_n, offs_d, skn, skd, kl, D, m_base, smm, smn, offs_m,
                        ok, scale_log2, MASK_KIND, PREC)
        m_i, l_i, acc, p = online_softmax_update(m_i, l_i, acc, s)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                    mask=(offs_n[:, None] < kl) & (offs_dv[None, :] < DV), other=0.0)
        acc += tl.dot(p.to(v.dtype), v, input_precision=PREC)
    live = l_i > 0.0
    out = acc / tl.where(live, l_i, 1.0)[:, None]
    tl.store(o_ptr + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod,
             out.to(o_ptr.dtype.element_ty), mask=(offs_m[:, None] < Lq) & (offs_dv[None, :] < DV))
    lse = tl.where(live, (m_i + tl.log2(tl.where(live, l_i, 1.0))) / 1.4426950408889634,
                   float("-inf"))
    tl.store(lse_ptr + bh * Lq + offs_m, lse, mask=offs_m < Lq)


@triton.jit
def _attention_backward_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, kl_ptr, do_ptr, lse_ptr, dlt_ptr, dk_ptr, dv_ptr,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
        smb, smh, smm, smn, sdb, sdh, sdm, sdd,
        Hq, Hkv, GROUP, Lq, Lk, D, DV, scale, delta, window,
        IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KL: tl.constexpr,
        MASK_KIND: tl.constexpr, PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr):
    """dK, dV (contiguous (B, Hkv, Lk, ·)) for BLOCK_N keys of one kv head."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    hk = bh % Hkv
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kl = Lk
    if HAS_KL:
        kl = tl.minimum(tl.load(kl_ptr + b).to(tl.int32), Lk)
    scale_log2 = scale * 1.4426950408889634
    k_base = k_ptr + b * skb + hk * skh
    k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=(offs_n[:, None] < kl) & (offs_d[None, :] < D), other=0.0)
    v = tl.load(v_ptr + b * svb + hk * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                mask=(offs_n[:, None] < kl) & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    # Query tiles that can see these keys: causal needs i ≥ j − δ, the window i < j − δ + w.
    q_lo = 0
    q_hi = Lq
    if IS_CAUSAL:
        q_lo = tl.maximum(n0 - delta, 0)
        q_lo = (q_lo // BLOCK_M) * BLOCK_M
    if HAS_WINDOW:
        q_hi = tl.minimum(q_hi, n0 + BLOCK_N - delta + window)
    if n0 >= kl:
        q_hi = q_lo          # every key of this tile is past the key length
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = q_ptr + b * sqb + h * sqh
        do_base = do_ptr + b * sdb + h * sdh
        m_base = mask_ptr + b * smb + h * smh
        for m0 in range(q_lo, q_hi, BLOCK_M):
            offs_m = m0 + offs_m0
            rm = offs_m < Lq
            q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                        mask=rm[:, None] & (offs_d[None, :] < D), other=0.0)
            do = tl.load(do_base + offs_m[:, None] * sdm + offs_dv[None, :] * sdd,
                         mask=rm[:, None] & (offs_dv[None, :] < DV), other=0.0)
            lse = tl.load(lse_ptr + (b * Hq + h) * Lq + offs_m, mask=rm, other=float("-inf"))
            dlt = tl.load(dlt_ptr + (b * Hq + h) * Lq + offs_m, mask=rm, other=0.0)
            ok = _allowed(offs_m, offs_n, Lq, kl, delta, window, IS_CAUSAL, HAS_WINDOW)
            s, ok = _scores(q, k_base, offs_n, offs_d, skn, skd, kl, D, m_base, smm, smn,
                            offs_m, ok, scale_log2, MASK_KIND, PREC)
            live = lse > float("-inf")
            lse2 = tl.where(live, lse * 1.4426950408889634, 0.0)
            p = tl.where(ok & live[:, None], tl.exp2(s - lse2[:, None]), 0.0)
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - dlt[:, None])
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)
    out_n = (offs_n[:, None] < Lk)
    tl.store(dk_ptr + (bh * Lk + offs_n[:, None]) * D + offs_d[None, :],
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=out_n & (offs_d[None, :] < D))
    tl.store(dv_ptr + (bh * Lk + offs_n[:, None]) * DV + offs_dv[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=out_n & (offs_dv[None, :] < DV))


@triton.jit
def _attention_backward_dq_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, kl_ptr, do_ptr, lse_ptr, dlt_ptr, dq_ptr,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
        smb, smh, smm, smn, sdb, sdh, sdm, sdd,
        Hq, GROUP, Lq, Lk, D, DV, scale, delta, window,
        IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KL: tl.constexpr,
        MASK_KIND: tl.constexpr, PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr):
    """dQ (contiguous (B, Hq, Lq, D)) for BLOCK_M queries of one query head."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    rm = offs_m < Lq
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kl = Lk
    if HAS_KL:
        kl = tl.minimum(tl.load(kl_ptr + b).to(tl.int32), Lk)
    scale_log2 = scale * 1.4426950408889634
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=rm[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(do_ptr + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_dv[None, :] * sdd,
                 mask=rm[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(lse_ptr + bh * Lq + offs_m, mask=rm, other=float("-inf"))
    dlt = tl.load(dlt_ptr + bh * Lq + offs_m, mask=rm, other=0.0)
    live = lse > float("-inf")
    lse2 = tl.where(live, lse * 1.4426950408889634, 0.0)
    k_base = k_ptr + b * skb + hk * skh
    v_base = v_ptr + b * svb + hk * svh
    m_base = mask_ptr + b * smb + h * smh
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    lo, hi = _key_range(m0, BLOCK_M, BLOCK_N, kl, delta, window, IS_CAUSAL, HAS_WINDOW)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + offs_n0
        ok = _allowed(offs_m, offs_n, Lq, kl, delta, window, IS_CAUSAL, HAS_WINDOW)
        s, ok = _scores(q, k_base, offs_n, offs_d, skn, skd, kl, D, m_base, smm, smn, offs_m,
                        ok, scale_log2, MASK_KIND, PREC)
        p = tl.where(ok & live[:, None], tl.exp2(s - lse2[:, None]), 0.0)
        vt = tl.load(v_base + offs_n[None, :] * svn + offs_dv[:, None] * svd,
                     mask=(offs_n[None, :] < kl) & (offs_dv[:, None] < DV), other=0.0)
        dp = tl.dot(do, vt, input_precision=PREC)
        ds = p * (dp - dlt[:, None])
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=(offs_n[:, None] < kl) & (offs_d[None, :] < D), other=0.0)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(dq_ptr + (bh * Lq + offs_m[:, None]) * D + offs_d[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=rm[:, None] & (offs_d[None, :] < D))


@triton.jit
def _attention_decode_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, kl_ptr, pacc_ptr, pm_ptr, pl_ptr,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smh, smm, smn,
        Hkv, GROUP, Lq, Lk, D, DV, scale_log2, delta, window, SPLIT_LEN, NUM_SPLITS,
        IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KL: tl.constexpr,
        MASK_KIND: tl.constexpr, PREC: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr):
    """Partial attention of all GROUP·Lq query rows of one kv head over keys
    [split·SPLIT_LEN, (split+1)·SPLIT_LEN). Row r is query head hk·GROUP + r // Lq, position
    r % Lq. Partials (unnormalised acc, base-2 max, sum) go to (B·Hkv, NUM_SPLITS, R, ·)."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    hk = bh % Hkv
    R = GROUP * Lq
    rr = tl.arange(0, BLOCK_R)
    rvalid = rr < R
    head = hk * GROUP + rr // Lq
    pos = rr % Lq
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n0 = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + b * sqb + head[:, None] * sqh + pos[:, None] * sqm
                + offs_d[None, :] * sqd, mask=rvalid[:, None] & (offs_d[None, :] < D), other=0.0)
    kl = Lk
    if HAS_KL:
        kl = tl.minimum(tl.load(kl_ptr + b).to(tl.int32), Lk)
    # keys any row can see: causal bounds from the last position, window from the first.
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, kl)
    if IS_CAUSAL:
        hi = tl.minimum(hi, Lq + delta)
    if HAS_WINDOW:
        lo = tl.maximum(lo, ((tl.maximum(delta - window + 1, 0)) // BLOCK_N) * BLOCK_N)
    k_base = k_ptr + b * skb + hk * skh
    v_base = v_ptr + b * svb + hk * svh
    m_i = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_DV), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + offs_n0
        ok = rvalid[:, None] & (offs_n[None, :] < hi)
        if IS_CAUSAL:
            ok = ok & (offs_n[None, :] <= pos[:, None] + delta)
        if HAS_WINDOW:
            ok = ok & (offs_n[None, :] > pos[:, None] + delta - window)
        kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=(offs_n[None, :] < hi) & (offs_d[:, None] < D), other=0.0)
        s = tl.dot(q, kt, input_precision=PREC) * scale_log2
        mp = mask_ptr + b * smb + head[:, None] * smh + pos[:, None] * smm + offs_n[None, :] * smn
        if MASK_KIND == 1:
            ok = ok & (tl.load(mp, mask=ok, other=0) != 0)
        if MASK_KIND == 2:
            s += tl.load(mp, mask=ok, other=0.0).to(tl.float32) * 1.4426950408889634
        s = tl.where(ok, s, float("-inf"))
        m_i, l_i, acc, p = online_softmax_update(m_i, l_i, acc, s)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                    mask=(offs_n[:, None] < hi) & (offs_dv[None, :] < DV), other=0.0)
        acc += tl.dot(p.to(v.dtype), v, input_precision=PREC)
    base = (bh * NUM_SPLITS + split) * R
    tl.store(pacc_ptr + (base + rr[:, None]) * DV + offs_dv[None, :], acc,
             mask=rvalid[:, None] & (offs_dv[None, :] < DV))
    tl.store(pm_ptr + base + rr, m_i, mask=rvalid)
    tl.store(pl_ptr + base + rr, l_i, mask=rvalid)


@triton.jit
def _attention_decode_combine_kernel(pacc_ptr, pm_ptr, pl_ptr, o_ptr, R, DV, NUM_SPLITS,
                                     BLOCK_DV: tl.constexpr):
    """out row = Σ_s 2^(m_s − M) acc_s / Σ_s 2^(m_s − M) l_s for one (B·Hkv, row)."""
    bh = tl.program_id(0)
    r = tl.program_id(1)
    offs = tl.arange(0, BLOCK_DV)
    M = float("-inf")
    for s in range(NUM_SPLITS):
        M = tl.maximum(M, tl.load(pm_ptr + (bh * NUM_SPLITS + s) * R + r))
    Ms = tl.where(M == float("-inf"), 0.0, M)
    acc = tl.zeros((BLOCK_DV,), dtype=tl.float32)
    den = 0.0
    for s in range(NUM_SPLITS):
        i = (bh * NUM_SPLITS + s) * R + r
        w = tl.exp2(tl.load(pm_ptr + i) - Ms)
        den += w * tl.load(pl_ptr + i)
        acc += w * tl.load(pacc_ptr + i * DV + offs, mask=offs < DV, other=0.0)
    out = acc / tl.where(den > 0.0, den, 1.0)
    tl.store(o_ptr + (bh * R + r) * DV + offs, out.to(o_ptr.dtype.element_ty), mask=offs < DV)


# ---------------------------------------------------------------- host side ----------------

def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _mask_args(attn_mask, q, k):
    """(tensor, kind, strides (b, h, m, n)) for an explicit mask broadcastable to
    (B, Hq, Lq, Lk); broadcast dims get stride 0 so nothing is materialised."""
    if attn_mask is None:
        return q, 0, (0, 0, 0, 0)
    m = attn_mask
    kind = 1 if m.dtype == torch.bool else 2
    if kind == 1:
        m = m.to(torch.uint8)      # triton has no bool pointers; one byte per entry, same strides
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return m, kind, tuple(m.stride())


def _common(q, k, v, attn_mask, key_lengths, is_causal, bottom_right, window):
    B, Hq, Lq, D = q.shape
    Hkv, Lk, DV = k.shape[1], k.shape[2], v.shape[3]
    delta = (Lk - Lq) if bottom_right else 0
    mask, kind, ms = _mask_args(attn_mask, q, k)
    kl = key_lengths if key_lengths is not None else q
    flags = dict(IS_CAUSAL=bool(is_causal), HAS_WINDOW=bool(window), HAS_KL=key_lengths is not None,
                 MASK_KIND=kind, PREC=dot_precision(q.dtype))
    return B, Hq, Lq, D, Hkv, Lk, DV, delta, mask, ms, kl, flags


_fwd_tuned = None


def _forward_launcher():
    """The forward kernel, autotuned on CUDA (key: lengths and head dims), plain otherwise."""
    global _fwd_tuned
    if interpreting():
        return None
    if _fwd_tuned is None:
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                   for m, n, w, s in _FWD_CONFIGS]
        _fwd_tuned = triton.autotune(configs, key=["Lq", "Lk", "D", "DV"])(
            _attention_forward_kernel)
    return _fwd_tuned


def attention_forward(q, k, v, attn_mask, key_lengths, is_causal, bottom_right, window, scale):
    """Same contract as ``seqkern::attention_forward``: 4-D q, k, v → (out, lse (B, Hq, Lq))."""
    check_device(q)
    B, Hq, Lq, D, Hkv, Lk, DV, delta, mask, ms, kl, flags = _common(
        q, k, v, attn_mask, key_lengths, is_causal, bottom_right, window)
    out = q.new_empty((B, Hq, Lq, DV))
    lse = q.new_empty((B, Hq, Lq), dtype=torch.float32)
    args = (q, k, v, mask, kl, out, lse, *q.stride(), *k.stride(), *v.stride(), *ms,
            *out.stride(), Hq, Hq // Hkv, Lq, Lk, D, DV, scale * math.log2(math.e), delta,
            int(window or 0))
    tuned = _forward_launcher()
    if tuned is None:
        bm = _INTERP_BLOCK
        _attention_forward_kernel[(triton.cdiv(Lq, bm), B * Hq)](
            *args, **flags, BLOCK_M=bm, BLOCK_N=bm, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV))
    else:
        tuned[lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)](
            *args, **flags, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV))
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, attn_mask, key_lengths, is_causal,
                       bottom_right, window, scale):
    """Same contract as ``seqkern::attention_backward`` → (dq, dk, dv)."""
    B, Hq, Lq, D, Hkv, Lk, DV, delta, mask, ms, kl, flags = _common(
        q, k, v, attn_mask, key_lengths, is_causal, bottom_right, window)
    # D_i = rowsum(dO ⊙ O): one elementwise pass, fp32.
    dlt = (grad_out.float() * out.float()).sum(-1).contiguous()
    dq = torch.empty((B, Hq, Lq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, Lk, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, Hkv, Lk, DV), dtype=v.dtype, device=q.device)
    if interpreting():
        bm = bn = _INTERP_BLOCK
        warps, stages = 4, 1
    else:
        bm, bn, warps, stages = _BWD_BLOCK
    strides = (*q.stride(), *k.stride(), *v.stride(), *ms, *grad_out.stride())
    blocks = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV),
                  num_warps=warps, num_stages=stages)
    _attention_backward_dkdv_kernel[(triton.cdiv(Lk, bn), B * Hkv)](
        q, k, v, mask, kl, grad_out, lse, dlt, dk, dv, *strides,
        Hq, Hkv, Hq // Hkv, Lq, Lk, D, DV, scale, delta, int(window or 0), **flags, **blocks)
    _attention_backward_dq_kernel[(triton.cdiv(Lq, bm), B * Hq)](
        q, k, v, mask, kl, grad_out, lse, dlt, dq, *strides,
        Hq, Hq // Hkv, Lq, Lk, D, DV, scale, delta, int(window or 0), **flags, **blocks)
    return dq, dk, dv


def attention_decode(q, k, v, attn_mask, key_lengths, is_causal, bottom_right, window, scale,
                     num_splits: int | None = None, block_n: int | None = None):
    """Inference-only attention for few queries (GQA group × Lq ≤ 128 rows) over a long cache,
    split along the keys. Same masks and result as ``attention_forward``'s output."""
    check_device(q)
    B, Hq, Lq, D, Hkv, Lk, DV, delta, mask, ms, kl, flags = _common(
        q, k, v, attn_mask, key_lengths, is_causal, bottom_right, window)
    group = Hq // Hkv
    R = group * Lq
    if R > 128:
        raise ValueError(f"decode kernel takes at most 128 query rows per kv head, got {R}")
    bn = block_n or (_INTERP_BLOCK if interpreting() else 64)
    if num_splits is None:
        # Enough programs to fill ~132 SMs twice, but every split keeps ≥ 4 key tiles of work.
        want = max(1, triton.cdiv(264, B * Hkv))
        num_splits = max(1, min(want, triton.cdiv(Lk, 4 * bn)))
    split_len = triton.cdiv(triton.cdiv(max(Lk, 1), num_splits), bn) * bn
    pacc = q.new_empty((B * Hkv, num_splits, R, DV), dtype=torch.float32)
    pm = q.new_empty((B * Hkv, num_splits, R), dtype=torch.float32)
    pl = q.new_empty((B * Hkv, num_splits, R), dtype=torch.float32)
    _attention_decode_kernel[(num_splits, B * Hkv)](
        q, k, v, mask, kl, pacc, pm, pl, *q.stride(), *k.stride(), *v.stride(), *ms,
        Hkv, group, Lq, Lk, D, DV, scale * math.log2(math.e), delta, int(window or 0),
        split_len, num_splits, **flags, BLOCK_R=_pow2(R), BLOCK_N=bn, BLOCK_D=_pow2(D),
        BLOCK_DV=_pow2(DV))
    # rows of (B·Hkv, R) are (head in group, position): exactly (B, Hq, Lq) order.
    out = q.new_empty((B, Hq, Lq, DV))
    _attention_decode_combine_kernel[(B * Hkv, R)](pacc, pm, pl, out, R, DV, num_splits,
                                                   BLOCK_DV=_pow2(DV))
    return out


class _Attention(torch.autograd.Function):
    """Autograd for CPU tensors under the interpreter (on CUDA the custom op carries it)."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, key_lengths, is_causal, bottom_right, window, scale):
        out, lse = attention_forward(q, k, v, attn_mask, key_lengths, is_causal, bottom_right,
                                     window, scale)
        ctx.args = (is_causal, bottom_right, window, scale)
        ctx.save_for_backward(q, k, v, out, lse, attn_mask, key_lengths)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, attn_mask, key_lengths = ctx.saved_tensors
        dq, dk, dv = attention_backward(grad_out.contiguous(), q, k, v, out, lse, attn_mask,
                                        key_lengths, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


# Decode path: when nothing needs a gradient and the query rows of a kv head fit one tile while
# the cache is long enough that splitting it along the keys pays.
DECODE_MAX_ROWS = 64
DECODE_MIN_KEYS = 256


def attention(q: Tensor, k: Tensor, v: Tensor, m, kl, is_causal: bool, bottom_right: bool,
              window: int, scale: float) -> Tensor:
    """The triton backend of ``seqkern.ops.scaled_dot_product_attention``: (B, H, L, D) operands
    and mask flags as ``seqkern.ops.attention`` prepares them (arguments already checked)."""
    flags = (is_causal, bottom_right, window, scale)
    needs_grad = _ext.needs_grad(q, k, v)
    rows = (q.shape[1] // k.shape[1]) * q.shape[2]
    if not needs_grad and rows <= DECODE_MAX_ROWS and k.shape[2] >= DECODE_MIN_KEYS:
        out = attention_decode(q, k, v, m, kl, *flags)
    elif q.device.type == "cuda":
        from seqkern.ops.attention import _attention_forward_op

        out, _ = _attention_forward_op(q, k, v, m, kl, *flags, 0.0, None)
    else:
        out = _Attention.apply(q, k, v, m, kl, *flags)
    return out
