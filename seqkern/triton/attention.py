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

Dropout (``_keep``) drops the weights the cpu kernels drop for the same seed: a hash of (row,
key, seed), regenerated per tile in the backward. The additive mask's gradient is dS, added
(atomically: programs of several heads or batches may share an element of a broadcast mask)
into a float32 buffer of the mask's shape by the dQ kernel, which visits every allowed (query,
key) pair once.

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
        ok = ok & (mv != float("-inf"))  # −inf rules the key out even where its score is NaN
    s = tl.where(ok, s, float("-inf"))
    return s, ok


@triton.jit
def _keep(rows, offs_n, seed, threshold):
    """Dropout's keep pattern, bit for bit the cpu kernels' (csrc/cpu/attention_common.h, Dropout):
    row r (flat (b·Hq + h)·Lq + i) has the key splitmix64(seed + (r + 1)·φ64) = (hi, lo), and
    its key j is kept iff mix32((lo + j·φ32) ^ hi) ≥ threshold = p·2³². A hash of indices, not a
    random stream, so the backward regenerates it tile by tile with nothing saved."""
    z = seed.to(tl.uint64) + (rows.to(tl.uint64) + 1) * 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    lo = (z & 0xFFFFFFFF).to(tl.uint32)
    hi = (z >> 32).to(tl.uint32)
    x = (lo[:, None] + offs_n.to(tl.uint32)[None, :] * 0x9E3779B9) ^ hi[:, None]
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x.to(tl.int64) >= threshold.to(tl.int64)


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
        Hq, GROUP, Lq, Lk, D, DV, scale_log2, delta, window, seed, threshold, keep_scale,
        IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KL: tl.constexpr,
        MASK_KIND: tl.constexpr, PREC: tl.constexpr, DROPOUT: tl.constexpr,
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
        if DROPOUT:  # the normaliser l_i is over the weights before dropout
            p = tl.where(_keep(bh * Lq + offs_m, offs_n, seed, threshold), p, 0.0)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                    mask=(offs_n[:, None] < kl) & (offs_dv[None, :] < DV), other=0.0)
        acc += tl.dot(p.to(v.dtype), v, input_precision=PREC)
    live = l_i > 0.0
    out = acc / tl.where(live, l_i, 1.0)[:, None]
    if DROPOUT:
        out = out * keep_scale
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
        Hq, Hkv, GROUP, Lq, Lk, D, DV, scale, delta, window, seed, threshold, keep_scale,
        IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KL: tl.constexpr,
        MASK_KIND: tl.constexpr, PREC: tl.constexpr, DROPOUT: tl.constexpr,
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
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            if DROPOUT:
                # O = (P ⊙ z)·V with z = keep / (1 − p): dV takes P ⊙ z, and the gradient that
                # reaches P is dP ⊙ z (Δ = rowsum(dO ⊙ O) already sums P ⊙ z ⊙ dP).
                z = tl.where(_keep((b * Hq + h) * Lq + offs_m, offs_n, seed, threshold),
                             keep_scale, 0.0)
                dv += tl.dot(tl.trans(p * z).to(do.dtype), do, input_precision=PREC)
                dp = dp * z
            else:
                dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)
            ds = p * (dp - dlt[:, None])
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)
    out_n = (offs_n[:, None] < Lk)
    tl.store(dk_ptr + (bh * Lk + offs_n[:, None]) * D + offs_d[None, :],
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=out_n & (offs_d[None, :] < D))
    tl.store(dv_ptr + (bh * Lk + offs_n[:, None]) * DV + offs_dv[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=out_n & (offs_dv[None, :] < DV))


@triton.jit
def _attention_backward_dq_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, kl_ptr, do_ptr, lse_ptr, dlt_ptr, dq_ptr, dm_ptr,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
        smb, smh, smm, smn, sdb, sdh, sdm, sdd, gmb, gmh, gmm, gmn,
        Hq, GROUP, Lq, Lk, D, DV, scale, delta, window, seed, threshold, keep_scale,
        IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KL: tl.constexpr,
        MASK_KIND: tl.constexpr, PREC: tl.constexpr, DROPOUT: tl.constexpr,
        MASK_GRAD: tl.constexpr, MG_SUM_M: tl.constexpr, MG_SUM_N: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr):
    """dQ (contiguous (B, Hq, Lq, D)) for BLOCK_M queries of one query head; with MASK_GRAD
    also the additive mask's gradient dS, added into dm_ptr (float32, the mask's own shape,
    read through strides that are 0 along the dims it broadcasts over: programs of different
    batches or heads may add into one element, hence atomics; a tile first sums its rows
    (MG_SUM_M) or keys (MG_SUM_N) when the mask broadcasts along them)."""
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
        if DROPOUT:
            dp = dp * tl.where(_keep(bh * Lq + offs_m, offs_n, seed, threshold), keep_scale, 0.0)
        ds = p * (dp - dlt[:, None])
        if MASK_GRAD:
            gp = dm_ptr + b * gmb + h * gmh
            if MG_SUM_M and MG_SUM_N:
                tl.atomic_add(gp, tl.sum(tl.sum(ds, 1), 0))
            elif MG_SUM_M:
                tl.atomic_add(gp + offs_n * gmn, tl.sum(ds, 0), mask=offs_n < Lk)
            elif MG_SUM_N:
                tl.atomic_add(gp + offs_m * gmm, tl.sum(ds, 1), mask=rm)
            else:
                tl.atomic_add(gp + offs_m[:, None] * gmm + offs_n[None, :] * gmn, ds,
                              mask=rm[:, None] & (offs_n[None, :] < Lk))
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
            mv = tl.load(mp, mask=ok, other=0.0)
            s += mv.to(tl.float32) * 1.4426950408889634
            ok = ok & (mv != float("-inf"))
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
    # (lengths past Lk mean all keys: clamped here, before the kernels read them as int32, and
    # made contiguous, as the kernels index them without a stride)
    kl = key_lengths.clamp_max(Lk).contiguous() if key_lengths is not None else q
    flags = dict(IS_CAUSAL=bool(is_causal), HAS_WINDOW=bool(window), HAS_KL=key_lengths is not None,
                 MASK_KIND=kind, PREC=dot_precision(q.dtype))
    return B, Hq, Lq, D, Hkv, Lk, DV, delta, mask, ms, kl, flags


def _dropout_args(dropout_p: float, dropout_seed) -> tuple[int, int, float]:
    """(seed, threshold, keep_scale) for the kernels, as the cpu kernels derive them: keep a
    weight iff its hash ≥ threshold = p·2³², and scale the kept ones by 1/(1 − p) (0 at p = 1)."""
    if not dropout_p:
        return 0, 0, 1.0
    if dropout_seed is None:
        raise ValueError("seqkern: dropout_p > 0 needs a dropout_seed")
    seed = int(dropout_seed.reshape(-1)[0].item()) if isinstance(dropout_seed, Tensor) \
        else int(dropout_seed)
    threshold = int(min(dropout_p * 4294967296.0, 4294967295.0))
    return seed, threshold, (0.0 if dropout_p >= 1 else 1.0 / (1.0 - dropout_p))


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


def attention_forward(q, k, v, attn_mask, key_lengths, is_causal, bottom_right, window, scale,
                      dropout_p: float = 0.0, dropout_seed=None, out_dtype=None):
    """Same contract as ``seqkern::attention_forward``: 4-D q, k, v → (out, lse (B, Hq, Lq)),
    lse in float32 here, out in ``out_dtype`` (default q's). Dropout drops the pattern
    ``seqkern.ops.dropout_keep_mask`` gives."""
    check_device(q)
    B, Hq, Lq, D, Hkv, Lk, DV, delta, mask, ms, kl, flags = _common(
        q, k, v, attn_mask, key_lengths, is_causal, bottom_right, window)
    flags["DROPOUT"] = bool(dropout_p)
    out = q.new_empty((B, Hq, Lq, DV), dtype=out_dtype or q.dtype)
    lse = q.new_empty((B, Hq, Lq), dtype=torch.float32)
    args = (q, k, v, mask, kl, out, lse, *q.stride(), *k.stride(), *v.stride(), *ms,
            *out.stride(), Hq, Hq // Hkv, Lq, Lk, D, DV, scale * math.log2(math.e), delta,
            int(window or 0), *_dropout_args(dropout_p, dropout_seed))
    tuned = _forward_launcher()
    if tuned is None:
        bm = _INTERP_BLOCK
        _attention_forward_kernel[(triton.cdiv(Lq, bm), B * Hq)](
            *args, **flags, BLOCK_M=bm, BLOCK_N=bm, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV))
    else:
        tuned[lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)](
            *args, **flags, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV))
    return out, lse


def _mask_grad_buffer(attn_mask, B, Hq, Lq, Lk):
    """A zeroed float32 gradient of the mask's shape (leading 1s up to 4 dims), its strides in
    the (B, Hq, Lq, Lk) view (0 along the dims the mask broadcasts over), and whether a tile
    must sum its rows / keys first."""
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    dm = torch.zeros(shape, dtype=torch.float32, device=attn_mask.device)
    strides = dm.expand(B, Hq, Lq, Lk).stride()
    return dm, strides, dict(MG_SUM_M=strides[2] == 0 and Lq > 1,
                             MG_SUM_N=strides[3] == 0 and Lk > 1)


def attention_backward(grad_out, q, k, v, out, lse, attn_mask, key_lengths, is_causal,
                       bottom_right, window, scale, dropout_p: float = 0.0, dropout_seed=None,
                       mask_grad: bool = False):
    """Same contract as ``seqkern::attention_backward`` → (dq, dk, dv, d attn_mask or None);
    the mask's gradient (an additive mask, when ``mask_grad``) has the mask's shape."""
    B, Hq, Lq, D, Hkv, Lk, DV, delta, mask, ms, kl, flags = _common(
        q, k, v, attn_mask, key_lengths, is_causal, bottom_right, window)
    flags["DROPOUT"] = bool(dropout_p)
    drop = _dropout_args(dropout_p, dropout_seed)
    if mask_grad:
        if attn_mask is None or attn_mask.dtype == torch.bool:
            raise ValueError("seqkern: mask_grad needs an additive (floating-point) attn_mask")
        dm, gstrides, sums = _mask_grad_buffer(attn_mask, B, Hq, Lq, Lk)
    else:
        dm, gstrides, sums = q, (0, 0, 0, 0), dict(MG_SUM_M=False, MG_SUM_N=False)
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
        Hq, Hkv, Hq // Hkv, Lq, Lk, D, DV, scale, delta, int(window or 0), *drop, **flags,
        **blocks)
    _attention_backward_dq_kernel[(triton.cdiv(Lq, bm), B * Hq)](
        q, k, v, mask, kl, grad_out, lse, dlt, dq, dm, *strides, *gstrides,
        Hq, Hq // Hkv, Lq, Lk, D, DV, scale, delta, int(window or 0), *drop, **flags,
        MASK_GRAD=bool(mask_grad), **sums, **blocks)
    return dq, dk, dv, (dm.to(attn_mask.dtype) if mask_grad else None)


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
    def forward(ctx, q, k, v, attn_mask, key_lengths, is_causal, bottom_right, window, scale,
                dropout_p, dropout_seed):
        # the output in float32 for the backward's Δ = rowsum(dO ⊙ O), as on CUDA: Δ from a
        # rounded fp16/bf16 output loses accuracy with peaked scores
        out, lse = attention_forward(q, k, v, attn_mask, key_lengths, is_causal, bottom_right,
                                     window, scale, dropout_p, dropout_seed,
                                     out_dtype=torch.float32)
        ctx.args = (is_causal, bottom_right, window, scale, dropout_p)
        ctx.save_for_backward(q, k, v, out, lse, attn_mask, key_lengths, dropout_seed)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError("seqkern attention: double backward is not supported")
        q, k, v, out, lse, attn_mask, key_lengths, dropout_seed = ctx.saved_tensors
        mask_grad = bool(ctx.needs_input_grad[3])
        dq, dk, dv, dm = attention_backward(grad_out.contiguous(), q, k, v, out, lse, attn_mask,
                                            key_lengths, *ctx.args, dropout_seed, mask_grad)
        return dq, dk, dv, dm, None, None, None, None, None, None, None


# Decode path: when nothing needs a gradient and the query rows of a kv head fit one tile while
# the cache is long enough that splitting it along the keys pays.
DECODE_MAX_ROWS = 64
DECODE_MIN_KEYS = 256


def attention(q: Tensor, k: Tensor, v: Tensor, m, kl, is_causal: bool, bottom_right: bool,
              window: int, scale: float, dropout_p: float = 0.0,
              dropout_seed: Tensor | None = None) -> Tensor:
    """The triton backend of ``seqkern.ops.scaled_dot_product_attention``: (B, H, L, D) operands
    and mask flags as ``seqkern.ops.attention`` prepares them (arguments already checked)."""
    flags = (is_causal, bottom_right, window, scale)
    if k.shape[1] == 0:  # no heads at all (checked: Hq = 0 too): an empty result in the graph
        return q.new_zeros((*q.shape[:3], v.shape[3])) + (q.sum() + k.sum() + v.sum()) * 0
    needs_grad = _ext.needs_grad(q, k, v, m)
    rows = (q.shape[1] // k.shape[1]) * q.shape[2]
    if (not needs_grad and not dropout_p and rows <= DECODE_MAX_ROWS
            and k.shape[2] >= DECODE_MIN_KEYS):
        out = attention_decode(q, k, v, m, kl, *flags)
    elif q.device.type == "cuda":
        from seqkern.ops.attention import _attention_forward_op

        # training: the output in the compute dtype for the backward's Δ, rounded here
        out, _ = _attention_forward_op(q, k, v, m, kl, *flags, float(dropout_p), dropout_seed,
                                       needs_grad)
        out = out.to(q.dtype)
    else:
        out = _Attention.apply(q, k, v, m, kl, *flags, float(dropout_p), dropout_seed)
    return out
