"""Triton causal dilated convolutions: grouped conv1d forward/backward, the depthwise path, the
fused WaveNet gated block, and the single-step streaming update.

x_ext = [initial_state | x] (P = (K−1)·d columns of history, zeros when absent) is never
built: a tap reads column t − (K−1−k)·d of x when it is ≥ 0 and column P + that of the state
otherwise, through two masked loads.

- ``_conv_forward_kernel``: one program per (BLOCK_T time steps, BLOCK_O output channels of
  one group, batch row); for each tap k and BLOCK_C input-channel chunk one
  ``tl.dot(W[o, c, k], x_ext[c, t − shift])`` into an fp32 (BLOCK_O, BLOCK_T) accumulator;
  bias and activation fused; the pre-activation is stored only when backward needs it.
- ``_conv_input_grad_kernel``: the transposed conv, dx_ext[c, u] = Σ_k Σ_o W[o, c, k] ·
  dpre[o, u − P + shift_k], over u ∈ [P, P + L) (plus [0, P) → d initial_state when given).
- ``_conv_weight_grad_kernel``: one program per (BLOCK_O, BLOCK_C, tap) accumulates
  dpre (O, B·L) @ x_ext_kᵀ (B·L, C) over batch and time — a matmul with a long reduction,
  no atomics.
- depthwise (groups = C_in = C_out, one input channel per output): no matmul; elementwise
  multiply-adds over a (BLOCK_C, BLOCK_T) tile in forward and input-grad, a per-channel
  reduction over (B, L) for the weight grad.
- WaveNet block: ``_wavenet_forward_kernel`` does the 2G-channel dilated conv, the gate
  tanh(a)⊙σ(b) and both 1×1 convs (skip, residual + x) for one (batch row, BLOCK_T) tile
  with the whole gate vector in registers (G ≤ BLOCK_G = next_pow2(G): meant for the usual
  G ≤ 256); it saves the raw conv output h for backward. ``_wavenet_gate_backward_kernel``
  forms dz = W_skipᵀ dskip + W_resᵀ dres and dh = (da, db) through the gate; the conv part
  reuses the conv input/weight-grad kernels and the 1×1 weight grads are matmuls over B·L.
- ``_conv_step_kernel``: one new column for streaming generation, y = act(b + Σ W · taps),
  one program per (batch row, BLOCK_O); the queue shift is a torch slice/cat.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from seqkern import _ext
from seqkern.triton.common import check_device, dot_precision, sigmoid, tanh

_ACT = {None: 0, "none": 0, "relu": 1, "silu": 2, "tanh": 3}
# Tiles: 16 is tl.dot's minimum; 64 time steps per program keeps x loads coalesced on GPU.
BLOCK_T, BLOCK_O, BLOCK_C = 64, 32, 32


@triton.jit
def _activate(y, ACT: tl.constexpr):
    if ACT == 1:
        y = tl.maximum(y, 0.0)
    elif ACT == 2:
        y = y * sigmoid(y)
    elif ACT == 3:
        y = tanh(y)
    return y


@triton.jit
def _load_ext(x_ptr, sxc, sxl, st_ptr, ssc, ssl, ch, cm, u, L, P, HAS_STATE: tl.constexpr):
    """x_ext[ch, P + u] for time u (may be negative → the state's column P + u)."""
    v = tl.load(x_ptr + ch[:, None] * sxc + u[None, :] * sxl,
                mask=cm[:, None] & (u[None, :] >= 0) & (u[None, :] < L), other=0.0)
    if HAS_STATE:
        v += tl.load(st_ptr + ch[:, None] * ssc + (P + u)[None, :] * ssl,
                     mask=cm[:, None] & (u[None, :] < 0) & (P + u[None, :] >= 0), other=0.0)
    return v


@triton.jit
def _finish_rows(acc, rows, rmask, row_base, offs_t, L, b_ptr, pre_ptr, y_ptr,
                 HAS_BIAS: tl.constexpr, SAVE_PRE: tl.constexpr, ACT: tl.constexpr):
    """Adds the bias, stores the pre-activation (when the backward needs it) and the activated
    output of a (rows × time) tile; output row r of this batch entry is at (row_base + r) · L."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
    ok = rmask[:, None] & (offs_t[None, :] < L)
    out_off = (row_base + rows[:, None]) * L + offs_t[None, :]
    if SAVE_PRE:
        tl.store(pre_ptr + out_off, acc.to(pre_ptr.dtype.element_ty), mask=ok)
    tl.store(y_ptr + out_off, _activate(acc, ACT).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _conv_forward_kernel(x_ptr, w_ptr, b_ptr, st_ptr, y_ptr, pre_ptr,
                         sxb, sxc, sxl, ssb, ssc, ssl,
                         L, C_OUT, CIG, COG, K, dil, P,
                         HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, ACT: tl.constexpr,
                         SAVE_PRE: tl.constexpr, PREC: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_o = tl.program_id(1)
    b = tl.program_id(2)
    n_ob = tl.cdiv(COG, BLOCK_O)
    g = pid_o // n_ob
    oo = (pid_o % n_ob) * BLOCK_O + tl.arange(0, BLOCK_O)
    om = oo < COG
    offs_o = g * COG + oo
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_O, BLOCK_T), dtype=tl.float32)
    for k in range(K):
        u = offs_t - (K - 1 - k) * dil
        for c0 in range(0, CIG, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            cm = cc < CIG
            xv = _load_ext(x_ptr + b * sxb, sxc, sxl, st_ptr + b * ssb, ssc, ssl, g * CIG + cc,
                           cm, u, L, P, HAS_STATE)
            w = tl.load(w_ptr + offs_o[:, None] * (CIG * K) + cc[None, :] * K + k,
                        mask=om[:, None] & cm[None, :], other=0.0)
            acc += tl.dot(w, xv.to(w.dtype), input_precision=PREC)
    _finish_rows(acc, offs_o, om, b * C_OUT, offs_t, L, b_ptr, pre_ptr, y_ptr, HAS_BIAS,
                 SAVE_PRE, ACT)


@triton.jit
def _conv_input_grad_kernel(d_ptr, w_ptr, dx_ptr, L, C_IN, C_OUT, CIG, COG, K, dil, P, U0, UL,
                            PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
                            BLOCK_C: tl.constexpr):
    """dx_ext[b, c, u] for u ∈ [U0, P + L) into dx (B, C_IN, UL = P + L − U0) at u − U0.
    d is the contiguous (B, C_OUT, L) gradient of the pre-activation."""
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2)
    n_cb = tl.cdiv(CIG, BLOCK_C)
    g = pid_c // n_cb
    cc = (pid_c % n_cb) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cc < CIG
    u = U0 + pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32)
    for k in range(K):
        t = u - P + (K - 1 - k) * dil            # the output column that read x_ext[u] via tap k
        tm = (t >= 0) & (t < L)
        for o0 in range(0, COG, BLOCK_O):
            oo = o0 + tl.arange(0, BLOCK_O)
            om = oo < COG
            wt = tl.load(w_ptr + (g * COG + oo)[None, :] * (CIG * K) + cc[:, None] * K + k,
                         mask=cm[:, None] & om[None, :], other=0.0)
            dv = tl.load(d_ptr + (b * C_OUT + g * COG + oo[:, None]) * L + t[None, :],
                         mask=om[:, None] & tm[None, :], other=0.0)
            acc += tl.dot(wt, dv.to(wt.dtype), input_precision=PREC)
    tl.store(dx_ptr + (b * C_IN + g * CIG + cc[:, None]) * UL + (u - U0)[None, :],
             acc.to(dx_ptr.dtype.element_ty), mask=cm[:, None] & (u[None, :] < P + L))


@triton.jit
def _conv_weight_grad_kernel(d_ptr, x_ptr, st_ptr, dw_ptr, sxb, sxc, sxl, ssb, ssc, ssl,
                             B, L, C_OUT, CIG, COG, K, dil, P,
                             HAS_STATE: tl.constexpr, PREC: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr):
    """dW[o, c, k] = Σ_b Σ_t dpre[b, o, t] · x_ext[b, c, t − (K−1−k)·d] (fp32 out)."""
    pid_o = tl.program_id(0)
    pid_c = tl.program_id(1)
    k = tl.program_id(2)
    n_ob = tl.cdiv(COG, BLOCK_O)
    g = pid_o // n_ob
    oo = (pid_o % n_ob) * BLOCK_O + tl.arange(0, BLOCK_O)
    om = oo < COG
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cc < CIG
    shift = (K - 1 - k) * dil
    acc = tl.zeros((BLOCK_O, BLOCK_C), dtype=tl.float32)
    for b in range(B):
        for t0 in range(0, L, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            dv = tl.load(d_ptr + (b * C_OUT + g * COG + oo[:, None]) * L + t[None, :],
                         mask=om[:, None] & (t[None, :] < L), other=0.0)
            xv = _load_ext(x_ptr + b * sxb, sxc, sxl, st_ptr + b * ssb, ssc, ssl, g * CIG + cc,
                           cm, t - shift, L, P, HAS_STATE)
            acc += tl.dot(dv, tl.trans(xv).to(dv.dtype), input_precision=PREC)
    tl.store(dw_ptr + (g * COG + oo[:, None]) * (CIG * K) + cc[None, :] * K + k, acc,
             mask=om[:, None] & cm[None, :])


@triton.jit
def _depthwise_forward_kernel(x_ptr, w_ptr, b_ptr, st_ptr, y_ptr, pre_ptr,
                              sxb, sxc, sxl, ssb, ssc, ssl, C, L, K, dil, P,
                              HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr,
                              ACT: tl.constexpr, SAVE_PRE: tl.constexpr,
                              BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2)
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cc < C
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32)
    for k in range(K):
        xv = _load_ext(x_ptr + b * sxb, sxc, sxl, st_ptr + b * ssb, ssc, ssl, cc, cm,
                       offs_t - (K - 1 - k) * dil, L, P, HAS_STATE)
        w = tl.load(w_ptr + cc * K + k, mask=cm, other=0.0).to(tl.float32)
        acc += w[:, None] * xv.to(tl.float32)
    _finish_rows(acc, cc, cm, b * C, offs_t, L, b_ptr, pre_ptr, y_ptr, HAS_BIAS, SAVE_PRE, ACT)


@triton.jit
def _depthwise_input_grad_kernel(d_ptr, w_ptr, dx_ptr, C, L, K, dil, P, U0, UL,
                                 BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2)
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cc < C
    u = U0 + pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32)
    for k in range(K):
        t = u - P + (K - 1 - k) * dil
        dv = tl.load(d_ptr + (b * C + cc[:, None]) * L + t[None, :],
                     mask=cm[:, None] & (t[None, :] >= 0) & (t[None, :] < L), other=0.0)
        w = tl.load(w_ptr + cc * K + k, mask=cm, other=0.0).to(tl.float32)
        acc += w[:, None] * dv.to(tl.float32)
    tl.store(dx_ptr + (b * C + cc[:, None]) * UL + (u - U0)[None, :],
             acc.to(dx_ptr.dtype.element_ty), mask=cm[:, None] & (u[None, :] < P + L))


@triton.jit
def _depthwise_weight_grad_kernel(d_ptr, x_ptr, st_ptr, dw_ptr, sxb, sxc, sxl, ssb, ssc, ssl,
                                  B, C, L, K, dil, P, HAS_STATE: tl.constexpr,
                                  BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_c = tl.program_id(0)
    k = tl.program_id(1)
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cc < C
    shift = (K - 1 - k) * dil
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for b in range(B):
        for t0 in range(0, L, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            dv = tl.load(d_ptr + (b * C + cc[:, None]) * L + t[None, :],
                         mask=cm[:, None] & (t[None, :] < L), other=0.0)
            xv = _load_ext(x_ptr + b * sxb, sxc, sxl, st_ptr + b * ssb, ssc, ssl, cc, cm,
                           t - shift, L, P, HAS_STATE)
            acc += tl.sum(dv.to(tl.float32) * xv.to(tl.float32), 1)
    tl.store(dw_ptr + cc * K + k, acc, mask=cm)


@triton.jit
def _wavenet_forward_kernel(x_ptr, cw_ptr, cb_ptr, st_ptr, sw_ptr, sb_ptr, rw_ptr, rb_ptr,
                            res_ptr, skip_ptr, h_ptr, sxb, sxc, sxl, ssb, ssc, ssl,
                            L, R, G, S, K, dil, P,
                            HAS_CB: tl.constexpr, HAS_SB: tl.constexpr, HAS_RB: tl.constexpr,
                            HAS_STATE: tl.constexpr, SAVE: tl.constexpr, PREC: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    gg = tl.arange(0, BLOCK_G)
    gm = gg < G
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = offs_t < L
    a = tl.zeros((BLOCK_G, BLOCK_T), dtype=tl.float32)
    bg = tl.zeros((BLOCK_G, BLOCK_T), dtype=tl.float32)
    for k in range(K):
        u = offs_t - (K - 1 - k) * dil
        for c0 in range(0, R, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            cm = cc < R
            xv = _load_ext(x_ptr + b * sxb, sxc, sxl, st_ptr + b * ssb, ssc, ssl, cc, cm, u, L,
                           P, HAS_STATE)
            wa = tl.load(cw_ptr + gg[:, None] * (R * K) + cc[None, :] * K + k,
                         mask=gm[:, None] & cm[None, :], other=0.0)
            wb = tl.load(cw_ptr + (G + gg)[:, None] * (R * K) + cc[None, :] * K + k,
                         mask=gm[:, None] & cm[None, :], other=0.0)
            xv = xv.to(wa.dtype)
            a += tl.dot(wa, xv, input_precision=PREC)
            bg += tl.dot(wb, xv, input_precision=PREC)
    ok = gm[:, None] & tm[None, :]
    if SAVE:
        tl.store(h_ptr + (b * 2 * G + gg[:, None]) * L + offs_t[None, :], a, mask=ok)
        tl.store(h_ptr + (b * 2 * G + G + gg[:, None]) * L + offs_t[None, :], bg, mask=ok)
    if HAS_CB:
        a += tl.load(cb_ptr + gg, mask=gm, other=0.0).to(tl.float32)[:, None]
        bg += tl.load(cb_ptr + G + gg, mask=gm, other=0.0).to(tl.float32)[:, None]
    z = tl.where(ok, tanh(a) * sigmoid(bg), 0.0)
    for s0 in range(0, S, BLOCK_C):
        ss = s0 + tl.arange(0, BLOCK_C)
        sm = ss < S
        w = tl.load(sw_ptr + ss[:, None] * G + gg[None, :], mask=sm[:, None] & gm[None, :],
                    other=0.0)
        out = tl.dot(w, z.to(w.dtype), input_precision=PREC)
        if HAS_SB:
            out += tl.load(sb_ptr + ss, mask=sm, other=0.0).to(tl.float32)[:, None]
        tl.store(skip_ptr + (b * S + ss[:, None]) * L + offs_t[None, :],
                 out.to(skip_ptr.dtype.element_ty), mask=sm[:, None] & tm[None, :])
    for r0 in range(0, R, BLOCK_C):
        rr = r0 + tl.arange(0, BLOCK_C)
        rm = rr < R
        w = tl.load(rw_ptr + rr[:, None] * G + gg[None, :], mask=rm[:, None] & gm[None, :],
                    other=0.0)
        out = tl.dot(w, z.to(w.dtype), input_precision=PREC)
        out += tl.load(x_ptr + b * sxb + rr[:, None] * sxc + offs_t[None, :] * sxl,
                       mask=rm[:, None] & tm[None, :], other=0.0).to(tl.float32)
        if HAS_RB:
            out += tl.load(rb_ptr + rr, mask=rm, other=0.0).to(tl.float32)[:, None]
        tl.store(res_ptr + (b * R + rr[:, None]) * L + offs_t[None, :],
                 out.to(res_ptr.dtype.element_ty), mask=rm[:, None] & tm[None, :])


@triton.jit
def _add_projection_grad(dz, w_ptr, d_ptr, N, G, gg, gm, b, offs_t, tm, L, PREC: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    """dz += Wᵀ · d for a 1×1 projection W (N, G) and its output gradient d (B, N, L), on the
    tile of gate channels gg × time offs_t; used for both the skip and the residual paths."""
    for n0 in range(0, N, BLOCK_C):
        nn = n0 + tl.arange(0, BLOCK_C)
        nm = nn < N
        wt = tl.load(w_ptr + nn[None, :] * G + gg[:, None], mask=gm[:, None] & nm[None, :],
                     other=0.0)
        d = tl.load(d_ptr + (b * N + nn[:, None]) * L + offs_t[None, :],
                    mask=nm[:, None] & tm[None, :], other=0.0)
        dz += tl.dot(wt, d.to(wt.dtype), input_precision=PREC)
    return dz


@triton.jit
def _wavenet_gate_backward_kernel(dres_ptr, dskip_ptr, sw_ptr, rw_ptr, h_ptr, cb_ptr,
                                  dh_ptr, z_ptr, L, R, G, S,
                                  HAS_CB: tl.constexpr, PREC: tl.constexpr,
                                  BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr,
                                  BLOCK_C: tl.constexpr):
    """dz = W_skipᵀ dskip + W_resᵀ dres; dh = (dz·σ(b)·(1−tanh²a), dz·tanh(a)·σ(b)(1−σ(b)));
    also writes z (for the 1×1 weight gradients)."""
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    gg = tl.arange(0, BLOCK_G)
    gm = gg < G
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = offs_t < L
    ok = gm[:, None] & tm[None, :]
    dz = tl.zeros((BLOCK_G, BLOCK_T), dtype=tl.float32)
    dz = _add_projection_grad(dz, sw_ptr, dskip_ptr, S, G, gg, gm, b, offs_t, tm, L, PREC, BLOCK_C)
    dz = _add_projection_grad(dz, rw_ptr, dres_ptr, R, G, gg, gm, b, offs_t, tm, L, PREC, BLOCK_C)
    a = tl.load(h_ptr + (b * 2 * G + gg[:, None]) * L + offs_t[None, :], mask=ok, other=0.0)
    bg = tl.load(h_ptr + (b * 2 * G + G + gg[:, None]) * L + offs_t[None, :], mask=ok, other=0.0)
    if HAS_CB:
        a += tl.load(cb_ptr + gg, mask=gm, other=0.0).to(tl.float32)[:, None]
        bg += tl.load(cb_ptr + G + gg, mask=gm, other=0.0).to(tl.float32)[:, None]
    ta = tanh(a)
    sb = sigmoid(bg)
    tl.store(z_ptr + (b * G + gg[:, None]) * L + offs_t[None, :], ta * sb, mask=ok)
    tl.store(dh_ptr + (b * 2 * G + gg[:, None]) * L + offs_t[None, :],
             dz * sb * (1.0 - ta * ta), mask=ok)
    tl.store(dh_ptr + (b * 2 * G + G + gg[:, None]) * L + offs_t[None, :],
             dz * ta * sb * (1.0 - sb), mask=ok)


@triton.jit
def _conv_step_kernel(x_ptr, st_ptr, w_ptr, b_ptr, y_ptr, C_IN, C_OUT, CIG, COG, K, dil, P,
                      HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                      BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr):
    """y[b, o] = act(bias + Σ_k Σ_c W[o, c, k] · x_ext[b, c, P − (K−1−k)·d]) for one new column;
    x (B, C_IN), state (B, C_IN, P), both contiguous. BLOCK_O output channels of one group."""
    b = tl.program_id(0)
    pid_o = tl.program_id(1)
    n_ob = tl.cdiv(COG, BLOCK_O)
    g = pid_o // n_ob
    oo = (pid_o % n_ob) * BLOCK_O + tl.arange(0, BLOCK_O)
    om = oo < COG
    offs_o = g * COG + oo
    acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for k in range(K):
        shift = (K - 1 - k) * dil
        for c0 in range(0, CIG, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            cm = cc < CIG
            ch = g * CIG + cc
            if shift == 0:
                xv = tl.load(x_ptr + b * C_IN + ch, mask=cm, other=0.0)
            else:
                xv = tl.load(st_ptr + (b * C_IN + ch) * P + P - shift, mask=cm, other=0.0)
            w = tl.load(w_ptr + offs_o[:, None] * (CIG * K) + cc[None, :] * K + k,
                        mask=om[:, None] & cm[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * xv.to(tl.float32)[None, :], 1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_o, mask=om, other=0.0).to(tl.float32)
    tl.store(y_ptr + b * C_OUT + offs_o, _activate(acc, ACT).to(y_ptr.dtype.element_ty),
             mask=om)


# ---------------------------------------------------------------- host side ----------------

def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


# The kernels index columns in int32: the look-back P plus the length, rounded up to a block,
# must stay below 2³¹ (the cpu kernels use int64 and go up to seqkern.ops.conv.MAX_LOOKBACK).
_MAX_COLUMNS = 2**31 - 1 - 4096


def _check_columns(P: int, L: int) -> None:
    if P + L > _MAX_COLUMNS:
        raise ValueError(f"(kernel_size - 1) * dilation + L = {P} + {L} exceeds what the triton "
                         f"conv kernels index ({_MAX_COLUMNS}); the cpu backend goes further")


def _state_args(x, initial_state):
    if initial_state is None:
        return x, (0, 0, 0), False
    return initial_state, tuple(initial_state.stride()), True


def conv_forward(x, weight, bias, initial_state, dilation, groups, activation, save_pre):
    """y (B, C_out, L) and the pre-activation (empty unless save_pre and an activation)."""
    check_device(x)
    B, C_in, L = x.shape
    C_out, CIG, K = weight.shape
    P = (K - 1) * dilation
    _check_columns(P, L)
    act = _ACT[activation]
    st, ss, has_st = _state_args(x, initial_state)
    y = x.new_empty((B, C_out, L))
    keep = save_pre and act != 0
    pre = x.new_empty((B, C_out, L) if keep else (1,), dtype=torch.float32)
    w = weight.contiguous()
    bias_ = bias.contiguous() if bias is not None else w  # (kernels index vectors unstrided)
    if groups == C_in == C_out:
        _depthwise_forward_kernel[(triton.cdiv(L, BLOCK_T), triton.cdiv(C_in, BLOCK_C), B)](
            x, w, bias_, st, y, pre, *x.stride(), *ss, C_in, L, K, dilation, P,
            HAS_BIAS=bias is not None, HAS_STATE=has_st, ACT=act, SAVE_PRE=keep,
            BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C)
    else:
        COG = C_out // groups
        _conv_forward_kernel[(triton.cdiv(L, BLOCK_T), triton.cdiv(COG, BLOCK_O) * groups, B)](
            x, w, bias_, st, y, pre, *x.stride(), *ss, L, C_out, CIG, COG, K, dilation, P,
            HAS_BIAS=bias is not None, HAS_STATE=has_st, ACT=act, SAVE_PRE=keep,
            PREC=dot_precision(x.dtype), BLOCK_T=BLOCK_T, BLOCK_O=BLOCK_O, BLOCK_C=BLOCK_C)
    return y, (pre if keep else x.new_empty((0,), dtype=torch.float32))


def _activation_grad(grad_y, y, pre, activation):
    """d pre-activation: relu/tanh from y, silu from the saved pre-activation."""
    g = grad_y.float()
    if activation in (None, "none"):
        return g.contiguous()
    if activation == "relu":
        return (g * (y > 0)).contiguous()
    if activation == "tanh":
        return (g * (1 - y.float() ** 2)).contiguous()
    s = torch.sigmoid(pre)
    return (g * s * (1 + pre * (1 - s))).contiguous()


def conv_input_weight_grad(d, x, weight, initial_state, dilation, groups):
    """(dx, dweight, dinitial_state or None) from the pre-activation gradient d (fp32)."""
    B, C_in, L = x.shape
    C_out, CIG, K = weight.shape
    P = (K - 1) * dilation
    st, ss, has_st = _state_args(x, initial_state)
    U0 = 0 if has_st else P           # without a state, columns [0, P) are constant zeros
    UL = P + L - U0
    dx_ext = x.new_empty((B, C_in, UL), dtype=torch.float32)
    dw = x.new_empty(weight.shape, dtype=torch.float32)
    w = weight.contiguous()
    if groups == C_in == C_out:
        _depthwise_input_grad_kernel[(triton.cdiv(UL, BLOCK_T), triton.cdiv(C_in, BLOCK_C), B)](
            d, w, dx_ext, C_in, L, K, dilation, P, U0, UL, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C)
        _depthwise_weight_grad_kernel[(triton.cdiv(C_in, BLOCK_C), K)](
            d, x, st, dw, *x.stride(), *ss, B, C_in, L, K, dilation, P, HAS_STATE=has_st,
            BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C)
    else:
        COG = C_out // groups
        prec = dot_precision(x.dtype)
        _conv_input_grad_kernel[(triton.cdiv(UL, BLOCK_T), triton.cdiv(CIG, BLOCK_C) * groups, B)](
            d, w, dx_ext,
            L, C_in, C_out, CIG, COG, K, dilation, P, U0, UL,
            PREC=prec, BLOCK_T=BLOCK_T, BLOCK_O=BLOCK_O, BLOCK_C=BLOCK_C)
        wgrid = (triton.cdiv(COG, BLOCK_O) * groups, triton.cdiv(CIG, BLOCK_C), K)
        _conv_weight_grad_kernel[wgrid](
            d, x, st, dw, *x.stride(), *ss, B, L, C_out, CIG, COG, K, dilation, P,
            HAS_STATE=has_st, PREC=prec, BLOCK_T=BLOCK_T, BLOCK_O=BLOCK_O, BLOCK_C=BLOCK_C)
    dx = dx_ext[:, :, UL - L:].to(x.dtype)
    dinit = dx_ext[:, :, :P].to(initial_state.dtype) if has_st else None
    return dx, dw.to(weight.dtype), dinit


class _CausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, dilation, groups, activation):
        y, pre = conv_forward(x, weight, bias, initial_state, dilation, groups, activation,
                              save_pre=activation == "silu")
        ctx.meta = (dilation, groups, activation, bias is not None)
        ctx.save_for_backward(x, weight, initial_state, y, pre)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():
            raise RuntimeError("seqkern.causal_conv1d: double backward is not supported")
        dilation, groups, activation, has_bias = ctx.meta
        x, weight, initial_state, y, pre = ctx.saved_tensors
        d = _activation_grad(grad_y, y, pre, activation)
        dx, dw, dinit = conv_input_weight_grad(d, x, weight, initial_state, dilation, groups)
        db = d.sum((0, 2)).to(weight.dtype) if has_bias else None
        return dx, dw, db, dinit, None, None, None


def causal_conv1d(x, weight, bias=None, dilation=1, groups=1, activation=None,
                  initial_state=None):
    """The triton backend of ``seqkern.ops.causal_conv1d`` (arguments checked); returns y."""
    if x.device.type == "cuda":
        from seqkern.ops.conv import _ACT_CODE, _SILU, _conv_op

        code = _ACT_CODE[activation]
        save = code == _SILU and _ext.needs_grad(x, weight, bias, initial_state)
        return _conv_op(x, weight, bias, initial_state, dilation, groups, code, save)[0]
    return _CausalConv.apply(x, weight, bias, initial_state, dilation, groups, activation)


def wavenet_forward(x, conv_weight, conv_bias, skip_weight, skip_bias, res_weight, res_bias,
                    initial_state, dilation, save):
    """(res, skip, h); h the raw 2G-channel conv output (fp32, before bias) when save."""
    check_device(x)
    B, R, L = x.shape
    G2, _, K = conv_weight.shape
    G, S = G2 // 2, skip_weight.shape[0]
    P = (K - 1) * dilation
    _check_columns(P, L)
    st, ss, has_st = _state_args(x, initial_state)
    res = x.new_empty((B, R, L))
    skip = x.new_empty((B, S, L))
    h = x.new_empty((B, G2, L) if save else (1,), dtype=torch.float32)
    cw = conv_weight.contiguous()
    sw = skip_weight.reshape(S, G).contiguous()
    rw = res_weight.reshape(R, G).contiguous()
    _wavenet_forward_kernel[(triton.cdiv(L, BLOCK_T), B)](
        x, cw, conv_bias.contiguous() if conv_bias is not None else cw, st, sw,
        skip_bias.contiguous() if skip_bias is not None else sw, rw,
        res_bias.contiguous() if res_bias is not None else rw,
        res, skip, h, *x.stride(), *ss, L, R, G, S, K, dilation, P,
        HAS_CB=conv_bias is not None, HAS_SB=skip_bias is not None, HAS_RB=res_bias is not None,
        HAS_STATE=has_st, SAVE=save, PREC=dot_precision(x.dtype),
        BLOCK_T=BLOCK_T, BLOCK_G=_pow2(G), BLOCK_C=BLOCK_C)
    return res, skip, (h if save else x.new_empty((0,), dtype=torch.float32))


class _WaveNetBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, conv_weight, conv_bias, skip_weight, skip_bias, res_weight, res_bias,
                initial_state, dilation):
        res, skip, h = wavenet_forward(x, conv_weight, conv_bias, skip_weight, skip_bias,
                                       res_weight, res_bias, initial_state, dilation, True)
        ctx.meta = (dilation, skip_bias is not None, res_bias is not None,
                    tuple(skip_weight.shape), tuple(res_weight.shape))
        ctx.save_for_backward(x, conv_weight, conv_bias, skip_weight, res_weight,
                              initial_state, h)
        return res, skip

    @staticmethod
    def backward(ctx, grad_res, grad_skip):
        if torch.is_grad_enabled():
            raise RuntimeError("seqkern.wavenet_block: double backward is not supported")
        dilation, has_sb, has_rb, sw_shape, rw_shape = ctx.meta
        x, conv_weight, conv_bias, skip_weight, res_weight, initial_state, h = ctx.saved_tensors
        if grad_res is None:
            grad_res = torch.zeros_like(x)
        if grad_skip is None:
            grad_skip = x.new_zeros((x.shape[0], skip_weight.shape[0], x.shape[2]))
        dx, dcw, dcb, dsw, dsb, drw, drb, dinit = wavenet_backward(
            grad_res, grad_skip, x, conv_weight, conv_bias, skip_weight, res_weight,
            initial_state, h, dilation, has_sb, has_rb)
        return (dx, dcw, dcb if conv_bias is not None else None, dsw.reshape(sw_shape),
                dsb if has_sb else None, drw.reshape(rw_shape), drb if has_rb else None,
                dinit if initial_state is not None else None, None)


def wavenet_backward(grad_res, grad_skip, x, conv_weight, conv_bias, skip_weight, res_weight,
                     initial_state, h, dilation, has_skip_bias, has_res_bias):
    """Same contract as ``seqkern::wavenet_block_backward``: (dx, dconv_w, dconv_b, dskip_w,
    dskip_b, dres_w, dres_b, dinitial_state), absent ones empty; skip/res weights (out, G)."""
    B, R, L = x.shape
    G = conv_weight.shape[0] // 2
    S = skip_weight.shape[0]
    grad_res = grad_res.float().contiguous()
    grad_skip = grad_skip.float().contiguous()
    sw = skip_weight.reshape(S, G).float().contiguous()
    rw = res_weight.reshape(R, G).float().contiguous()
    dh = x.new_empty((B, 2 * G, L), dtype=torch.float32)
    z = x.new_empty((B, G, L), dtype=torch.float32)
    _wavenet_gate_backward_kernel[(triton.cdiv(L, BLOCK_T), B)](
        grad_res, grad_skip, sw, rw, h.float().contiguous(),
        conv_bias.contiguous() if conv_bias is not None else sw, dh, z, L, R, G, S,
        HAS_CB=conv_bias is not None, PREC=dot_precision(torch.float32),
        BLOCK_T=BLOCK_T, BLOCK_G=_pow2(G), BLOCK_C=BLOCK_C)
    dx, dcw, dinit = conv_input_weight_grad(dh, x, conv_weight, initial_state, dilation, 1)
    dx = dx + grad_res.to(x.dtype)
    # 1×1 weight gradients: (out, B·L) @ (B·L, G) matmuls.
    zf = z.transpose(0, 1).reshape(G, B * L)
    dsw = grad_skip.transpose(0, 1).reshape(S, B * L) @ zf.t()
    drw = grad_res.transpose(0, 1).reshape(R, B * L) @ zf.t()
    wt, empty = x.dtype, x.new_empty((0,))
    return (dx, dcw, dh.sum((0, 2)).to(wt) if conv_bias is not None else empty, dsw.to(wt),
            grad_skip.sum((0, 2)).to(wt) if has_skip_bias else empty, drw.to(wt),
            grad_res.sum((0, 2)).to(wt) if has_res_bias else empty,
            dinit if dinit is not None else empty)


def wavenet_block(x, conv_weight, conv_bias, skip_weight, skip_bias, res_weight, res_bias,
                  dilation=1, initial_state=None):
    """The triton backend of ``seqkern.ops.wavenet_block`` (arguments checked) → (res, skip)."""
    if x.device.type == "cuda":
        from seqkern.ops.conv import _wavenet_op

        save = _ext.needs_grad(x, conv_weight, conv_bias, skip_weight, skip_bias, res_weight,
                               res_bias, initial_state)
        sw = skip_weight.reshape(skip_weight.shape[0], skip_weight.shape[1])
        rw = res_weight.reshape(res_weight.shape[0], res_weight.shape[1])
        res, skip, _ = _wavenet_op(x, conv_weight, conv_bias, sw, skip_bias, rw, res_bias,
                                   initial_state, dilation, save)
        return res, skip
    return _WaveNetBlock.apply(x, conv_weight, conv_bias, skip_weight, skip_bias, res_weight,
                               res_bias, initial_state, dilation)


def causal_conv1d_step(x_t: Tensor, state: Tensor, weight: Tensor, bias=None, dilation=1,
                       groups=1, activation=None):
    """Streaming step (inference): (y_t (B, C_out), new state). Not differentiable."""
    check_device(x_t)
    B, C_in = x_t.shape
    C_out, CIG, K = weight.shape
    P = (K - 1) * dilation
    COG = C_out // groups
    x_c, st = x_t.contiguous(), state.contiguous()
    w = weight.contiguous()
    y = x_t.new_empty((B, C_out))
    _conv_step_kernel[(B, triton.cdiv(COG, BLOCK_O) * groups)](
        x_c, st if P > 0 else x_c, w, bias.contiguous() if bias is not None else w, y,
        C_in, C_out, CIG, COG, K, dilation, max(P, 1),
        HAS_BIAS=bias is not None, ACT=_ACT[activation], BLOCK_O=BLOCK_O, BLOCK_C=BLOCK_C)
    new_state = torch.cat([st[:, :, 1:], x_c[:, :, None]], dim=2) if P > 0 else st
    return y, new_state
