"""Triton recurrences: RNN (tanh/relu), LSTM (peephole, projection), GRU ("gru" reset-after and
"gru_cho" reset-before), forward and backward, over the packed layout of ``seqkern.ops.rnn``.

Design: one persistent program per batch tile of BLOCK_B rows loops over all T steps.
- The input projection of every step, ``x @ W_ihᵀ + b_ih``, is one (N, I) × (I, G·H) matmul
  before the loop (cuBLAS-sized, tensor cores), so the loop only does the recurrent part.
- Per step the program computes h_{t-1} @ W_hhᵀ for ALL G·H gate columns of its rows, H in
  BLOCK_H column blocks, each gate's ``tl.dot`` accumulated over Hs in BLOCK_K chunks and fused
  with the gate math and the state update (nothing but the results leaves the program).
- Why batch tiles and not hidden-column tiles: the next step needs the whole h_t, so splitting
  columns across programs needs a grid-wide barrier per step (cooperative launch, which Triton
  does not offer) or one launch per step (T launches, ~5 µs each, dominating small layers).
  A batch tile owns everything it needs; the price is parallelism of only ⌈B/BLOCK_B⌉
  programs, and W_hh is re-read from L2 every step (it does not fit in shared memory beyond
  H ≈ 100 in fp32), so this is a latency design for the sequential part, not a peak-FLOP one.
- Phases inside a step (h_{t-1} staging, gates, GRU-Cho's second matmul over r⊙h, the LSTM
  projection) communicate through global scratch written and read by the same program,
  separated by ``tl.debug_barrier()`` (a CTA barrier, which also orders the global accesses).
- Variable length: the packed rows of step t are [off_t, off_t + bs_t); a host-computed
  schedule gives each step its row count, where the previous state lives (the packed output
  of the previous step, or h0 for a sequence's first step) and which rows finish (→ h_n).
- Backward is the same program structure running the schedule in reverse: per step, gate
  gradients for each column block (fused, elementwise, with dc carried in place), then
  dh_{t-1} = dG_t @ W_hh in a second phase. dG for every step is kept (N × G·H), so the weight
  gradients are large matmuls after the loop: dW_ih = dGᵀ x, dW_hh = dGᵀ h_prev,
  dx = dG W_ih, biases and peepholes as column sums.
Saved for backward (the ``ops.rnn`` custom-op contract): activated gates (GRU also W_hn h +
b_hn), LSTM cells [c_{t-1}, c_t (, o⊙tanh c_t with projection)], and h_{t-1} per packed row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from seqkern import _ext, registry
from seqkern.triton.common import check_device, dot_acc, dot_precision, sigmoid, tanh

_MODE_CODE = {"rnn_tanh": 0, "rnn_relu": 1, "lstm": 2, "gru": 3, "gru_cho": 4}
_GATES = {0: 1, 1: 1, 2: 4, 3: 3, 4: 3}

# Block sizes. BLOCK_B = 16 is the smallest tl.dot M on tensor cores; 32-wide column/K blocks
# keep a step's live registers small (a persistent program cannot spill across steps cheaply).
# These are not autotuned: the work per program is tiny and fixed, and autotuning a kernel that
# loops T times would time whole sequences per config.
BLOCK_B, BLOCK_H, BLOCK_K = 16, 32, 32


@triton.jit
def _load_rows(ptr, stride, rows, col0, cols, mask):
    return tl.load(ptr + rows[:, None] * stride + col0 + cols[None, :], mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def _store_rows(ptr, stride, rows, col0, cols, val, mask):
    tl.store(ptr + rows[:, None] * stride + col0 + cols[None, :],
             val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _colvec(ptr, cols, cm):
    """A per-column parameter (bias, peephole) as a (1, BLOCK_H) fp32 row."""
    return tl.load(ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _recurrent_forward_kernel(
        xp_ptr, whh_ptr, bhh_ptr, peep_ptr, whr_ptr, h0_ptr, c0_ptr, sched_ptr,
        out_ptr, hn_ptr, cn_ptr, gates_ptr, cells_ptr, hprev_ptr, scratch_ptr,
        T, H, HS,
        MODE: tl.constexpr, HAS_BHH: tl.constexpr, HAS_PEEP: tl.constexpr,
        HAS_PROJ: tl.constexpr, PREC: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    G: tl.constexpr = 4 if MODE == 2 else (3 if MODE >= 3 else 1)
    GH = G * H
    GW = 4 * H if MODE == 3 else GH          # saved-gate row width
    CW = 3 * H if HAS_PROJ else 2 * H        # LSTM cell row width
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    for s in range(T):
        bs = tl.load(sched_ptr + s)
        if pid * BLOCK_B < bs:
            off = tl.load(sched_ptr + T + s)
            poff = tl.load(sched_ptr + 2 * T + s)
            pbs = tl.load(sched_ptr + 3 * T + s)
            fbs = tl.load(sched_ptr + 4 * T + s)
            alive = rows < bs
            has_prev = alive & (rows < pbs)
            first = alive & (rows >= pbs)
            fin = alive & (rows >= fbs)
            prow = off + rows
            # Phase 0: stage h_{t-1} of these rows into their ws_hprev rows (also what backward
            # needs); it comes from the previous step's output rows or from h0.
            for k0 in range(0, HS, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                km = kk[None, :] < HS
                hp = _load_rows(out_ptr, HS, poff + rows, 0, kk, has_prev[:, None] & km) + \
                    _load_rows(h0_ptr, HS, rows, 0, kk, first[:, None] & km)
                _store_rows(hprev_ptr, HS, prow, 0, kk, hp, alive[:, None] & km)
            tl.debug_barrier()
            for j0 in range(0, H, BLOCK_H):
                cols = j0 + tl.arange(0, BLOCK_H)
                cm = cols < H
                m2 = alive[:, None] & cm[None, :]
                zero = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                if MODE <= 1:
                    a = _load_rows(xp_ptr, GH, prow, 0, cols, m2)
                    if HAS_BHH:
                        a += _colvec(bhh_ptr, cols, cm)
                    a = dot_acc(a, hprev_ptr, HS, prow, alive, whh_ptr, 1, HS, cols, cm, HS,
                                PREC, BLOCK_K)
                    if MODE == 0:
                        h = tanh(a)
                    else:
                        h = tl.maximum(a, 0.0)
                    _store_rows(out_ptr, HS, prow, 0, cols, h, m2)
                    _store_rows(hn_ptr, HS, rows, 0, cols, h, fin[:, None] & cm[None, :])
                elif MODE == 2:
                    pre_i = _load_rows(xp_ptr, GH, prow, 0, cols, m2)
                    pre_f = _load_rows(xp_ptr, GH, prow, H, cols, m2)
                    pre_g = _load_rows(xp_ptr, GH, prow, 2 * H, cols, m2)
                    pre_o = _load_rows(xp_ptr, GH, prow, 3 * H, cols, m2)
                    if HAS_BHH:
                        pre_i += _colvec(bhh_ptr, cols, cm)
                        pre_f += _colvec(bhh_ptr + H, cols, cm)
                        pre_g += _colvec(bhh_ptr + 2 * H, cols, cm)
                        pre_o += _colvec(bhh_ptr + 3 * H, cols, cm)
                    pre_i = dot_acc(pre_i, hprev_ptr, HS, prow, alive, whh_ptr, 1, HS, cols, cm,
                                    HS, PREC, BLOCK_K)
                    pre_f = dot_acc(pre_f, hprev_ptr, HS, prow, alive, whh_ptr + H * HS, 1, HS,
                                    cols, cm, HS, PREC, BLOCK_K)
                    pre_g = dot_acc(pre_g, hprev_ptr, HS, prow, alive, whh_ptr + 2 * H * HS, 1,
                                    HS, cols, cm, HS, PREC, BLOCK_K)
                    pre_o = dot_acc(pre_o, hprev_ptr, HS, prow, alive, whh_ptr + 3 * H * HS, 1,
                                    HS, cols, cm, HS, PREC, BLOCK_K)
                    # c_{t-1}: the previous step's c_t (kept in its ws_cells row) or c0.
                    cp = _load_rows(cells_ptr, CW, poff + rows, H, cols,
                                    has_prev[:, None] & cm[None, :]) + \
                        _load_rows(c0_ptr, H, rows, 0, cols, first[:, None] & cm[None, :])
                    if HAS_PEEP:
                        pre_i += _colvec(peep_ptr, cols, cm) * cp
                        pre_f += _colvec(peep_ptr + H, cols, cm) * cp
                    gi = sigmoid(pre_i)
                    gf = sigmoid(pre_f)
                    gg = tanh(pre_g)
                    c = gf * cp + gi * gg
                    if HAS_PEEP:
                        pre_o += _colvec(peep_ptr + 2 * H, cols, cm) * c
                    go = sigmoid(pre_o)
                    m = go * tanh(c)
                    _store_rows(gates_ptr, GW, prow, 0, cols, gi, m2)
                    _store_rows(gates_ptr, GW, prow, H, cols, gf, m2)
                    _store_rows(gates_ptr, GW, prow, 2 * H, cols, gg, m2)
                    _store_rows(gates_ptr, GW, prow, 3 * H, cols, go, m2)
                    _store_rows(cells_ptr, CW, prow, 0, cols, cp, m2)
                    _store_rows(cells_ptr, CW, prow, H, cols, c, m2)
                    _store_rows(cn_ptr, H, rows, 0, cols, c, fin[:, None] & cm[None, :])
                    if HAS_PROJ:
                        _store_rows(cells_ptr, CW, prow, 2 * H, cols, m, m2)
                    else:
                        _store_rows(out_ptr, HS, prow, 0, cols, m, m2)
                        _store_rows(hn_ptr, HS, rows, 0, cols, m, fin[:, None] & cm[None, :])
                else:
                    pre_r = _load_rows(xp_ptr, GH, prow, 0, cols, m2)
                    pre_z = _load_rows(xp_ptr, GH, prow, H, cols, m2)
                    if HAS_BHH:
                        pre_r += _colvec(bhh_ptr, cols, cm)
                        pre_z += _colvec(bhh_ptr + H, cols, cm)
                    pre_r = dot_acc(pre_r, hprev_ptr, HS, prow, alive, whh_ptr, 1, HS, cols, cm,
                                    HS, PREC, BLOCK_K)
                    pre_z = dot_acc(pre_z, hprev_ptr, HS, prow, alive, whh_ptr + H * HS, 1, HS,
                                    cols, cm, HS, PREC, BLOCK_K)
                    r = sigmoid(pre_r)
                    z = sigmoid(pre_z)
                    hp = _load_rows(hprev_ptr, HS, prow, 0, cols, m2)
                    _store_rows(gates_ptr, GW, prow, 0, cols, r, m2)
                    _store_rows(gates_ptr, GW, prow, H, cols, z, m2)
                    if MODE == 3:
                        hn_ = zero
                        if HAS_BHH:
                            hn_ += _colvec(bhh_ptr + 2 * H, cols, cm)
                        hn_ = dot_acc(hn_, hprev_ptr, HS, prow, alive, whh_ptr + 2 * H * HS, 1,
                                      HS, cols, cm, HS, PREC, BLOCK_K)
                        n = tanh(_load_rows(xp_ptr, GH, prow, 2 * H, cols, m2) + r * hn_)
                        h = (1.0 - z) * n + z * hp
                        _store_rows(gates_ptr, GW, prow, 2 * H, cols, n, m2)
                        _store_rows(gates_ptr, GW, prow, 3 * H, cols, hn_, m2)
                        _store_rows(out_ptr, HS, prow, 0, cols, h, m2)
                        _store_rows(hn_ptr, HS, rows, 0, cols, h, fin[:, None] & cm[None, :])
                    else:
                        # Cho: the n-block matmul reads r ⊙ h_{t-1} over all H, so it waits
                        # for every column block's r (phase below).
                        _store_rows(scratch_ptr, H, rows, 0, cols, r * hp, m2)
            if MODE == 4:
                tl.debug_barrier()
                for j0 in range(0, H, BLOCK_H):
                    cols = j0 + tl.arange(0, BLOCK_H)
                    cm = cols < H
                    m2 = alive[:, None] & cm[None, :]
                    pre_n = _load_rows(xp_ptr, GH, prow, 2 * H, cols, m2)
                    if HAS_BHH:
                        pre_n += _colvec(bhh_ptr + 2 * H, cols, cm)
                    pre_n = dot_acc(pre_n, scratch_ptr, H, rows, alive, whh_ptr + 2 * H * HS, 1,
                                    HS, cols, cm, H, PREC, BLOCK_K)
                    n = tanh(pre_n)
                    z = _load_rows(gates_ptr, GW, prow, H, cols, m2)
                    hp = _load_rows(hprev_ptr, HS, prow, 0, cols, m2)
                    h = (1.0 - z) * n + z * hp
                    _store_rows(gates_ptr, GW, prow, 2 * H, cols, n, m2)
                    _store_rows(out_ptr, HS, prow, 0, cols, h, m2)
                    _store_rows(hn_ptr, HS, rows, 0, cols, h, fin[:, None] & cm[None, :])
            if HAS_PROJ:
                tl.debug_barrier()
                for p0 in range(0, HS, BLOCK_H):
                    pc = p0 + tl.arange(0, BLOCK_H)
                    pm = pc < HS
                    h = dot_acc(tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32), cells_ptr + 2 * H,
                                CW, prow, alive, whr_ptr, 1, H, pc, pm, H, PREC, BLOCK_K)
                    _store_rows(out_ptr, HS, prow, 0, pc, h, alive[:, None] & pm[None, :])
                    _store_rows(hn_ptr, HS, rows, 0, pc, h, fin[:, None] & pm[None, :])
            # This step's outputs are the next step's h_{t-1}.
            tl.debug_barrier()


@triton.jit
def _recurrent_backward_kernel(
        gout_ptr, whh_ptr, peep_ptr, whr_ptr, out_ptr, gates_ptr, cells_ptr, hprev_ptr,
        sched_ptr, dh_ptr, dc_ptr, dg_ptr, dhall_ptr,
        T, H, HS,
        MODE: tl.constexpr, HAS_GOUT: tl.constexpr, HAS_PEEP: tl.constexpr,
        HAS_PROJ: tl.constexpr, PREC: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """dh_ptr (B, HS) / dc_ptr (B, H) hold the running state gradients (start: grad_hn /
    grad_cn; end: dh0 / dc0). dg_ptr (N, DW) receives the pre-activation gate gradients:
    GRU [dr, dz, dn, dn⊙r] (input side uses dn, recurrent side dn⊙r), others G·H."""
    G: tl.constexpr = 4 if MODE == 2 else (3 if MODE >= 3 else 1)
    GH = G * H
    GW = 4 * H if MODE == 3 else GH
    DW = GW
    CW = 3 * H if HAS_PROJ else 2 * H
    NG: tl.constexpr = 2 if MODE == 4 else G     # gate blocks whose matmul reads h_{t-1}
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    for s_rev in range(T):
        s = T - 1 - s_rev
        bs = tl.load(sched_ptr + s)
        if pid * BLOCK_B < bs:
            off = tl.load(sched_ptr + T + s)
            alive = rows < bs
            prow = off + rows
            # Phase A0: total gradient reaching h_t = from the output + from step t+1.
            if HAS_GOUT:
                for k0 in range(0, HS, BLOCK_K):
                    kk = k0 + tl.arange(0, BLOCK_K)
                    mk = alive[:, None] & (kk[None, :] < HS)
                    d = _load_rows(dh_ptr, HS, rows, 0, kk, mk) + \
                        _load_rows(gout_ptr, HS, prow, 0, kk, mk)
                    _store_rows(dh_ptr, HS, rows, 0, kk, d, mk)
            if HAS_PROJ:
                for k0 in range(0, HS, BLOCK_K):
                    kk = k0 + tl.arange(0, BLOCK_K)
                    mk = alive[:, None] & (kk[None, :] < HS)
                    _store_rows(dhall_ptr, HS, prow, 0, kk, _load_rows(dh_ptr, HS, rows, 0, kk, mk),
                                mk)
            tl.debug_barrier()
            # Phase A: gate gradients per column block.
            for j0 in range(0, H, BLOCK_H):
                cols = j0 + tl.arange(0, BLOCK_H)
                cm = cols < H
                m2 = alive[:, None] & cm[None, :]
                if HAS_PROJ:
                    # dm = dh_t @ W_hr (W_hr is (HS, H), read in place)
                    dh = dot_acc(tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32), dh_ptr, HS,
                                 rows, alive, whr_ptr, H, 1, cols, cm, HS, PREC, BLOCK_K)
                else:
                    dh = _load_rows(dh_ptr, HS, rows, 0, cols, m2)
                if MODE <= 1:
                    h = _load_rows(out_ptr, HS, prow, 0, cols, m2)
                    if MODE == 0:
                        dpre = dh * (1.0 - h * h)
                    else:
                        dpre = tl.where(h > 0.0, dh, 0.0)
                    _store_rows(dg_ptr, DW, prow, 0, cols, dpre, m2)
                elif MODE == 2:
                    gi = _load_rows(gates_ptr, GW, prow, 0, cols, m2)
                    gf = _load_rows(gates_ptr, GW, prow, H, cols, m2)
                    gg = _load_rows(gates_ptr, GW, prow, 2 * H, cols, m2)
                    go = _load_rows(gates_ptr, GW, prow, 3 * H, cols, m2)
                    cp = _load_rows(cells_ptr, CW, prow, 0, cols, m2)
                    c = _load_rows(cells_ptr, CW, prow, H, cols, m2)
                    dc = _load_rows(dc_ptr, H, rows, 0, cols, m2)
                    tc = tanh(c)
                    do_pre = dh * tc * go * (1.0 - go)
                    dc += dh * go * (1.0 - tc * tc)
                    if HAS_PEEP:
                        dc += do_pre * _colvec(peep_ptr + 2 * H, cols, cm)
                    di_pre = dc * gg * gi * (1.0 - gi)
                    df_pre = dc * cp * gf * (1.0 - gf)
                    dg_pre = dc * gi * (1.0 - gg * gg)
                    dcp = dc * gf
                    if HAS_PEEP:
                        dcp += di_pre * _colvec(peep_ptr, cols, cm)
                        dcp += df_pre * _colvec(peep_ptr + H, cols, cm)
                    _store_rows(dc_ptr, H, rows, 0, cols, dcp, m2)
                    _store_rows(dg_ptr, DW, prow, 0, cols, di_pre, m2)
                    _store_rows(dg_ptr, DW, prow, H, cols, df_pre, m2)
                    _store_rows(dg_ptr, DW, prow, 2 * H, cols, dg_pre, m2)
                    _store_rows(dg_ptr, DW, prow, 3 * H, cols, do_pre, m2)
                else:
                    r = _load_rows(gates_ptr, GW, prow, 0, cols, m2)
                    z = _load_rows(gates_ptr, GW, prow, H, cols, m2)
                    n = _load_rows(gates_ptr, GW, prow, 2 * H, cols, m2)
                    hp = _load_rows(hprev_ptr, HS, prow, 0, cols, m2)
                    dn_pre = dh * (1.0 - z) * (1.0 - n * n)
                    dz_pre = dh * (hp - n) * z * (1.0 - z)
                    _store_rows(dg_ptr, DW, prow, H, cols, dz_pre, m2)
                    _store_rows(dg_ptr, DW, prow, 2 * H, cols, dn_pre, m2)
                    if MODE == 3:
                        hn_ = _load_rows(gates_ptr, GW, prow, 3 * H, cols, m2)
                        _store_rows(dg_ptr, DW, prow, 0, cols, dn_pre * hn_ * r * (1.0 - r), m2)
                        _store_rows(dg_ptr, DW, prow, 3 * H, cols, dn_pre * r, m2)
                    # direct path h' = ... + z ⊙ h; the matmul paths are added in phase B.
                    _store_rows(dh_ptr, HS, rows, 0, cols, dh * z, m2)
            if MODE == 4:
                # Cho: d(r⊙h) = dn_pre @ W_hn needs every column block's dn_pre.
                tl.debug_barrier()
                for j0 in range(0, H, BLOCK_H):
                    cols = j0 + tl.arange(0, BLOCK_H)
                    cm = cols < H
                    m2 = alive[:, None] & cm[None, :]
                    drh = dot_acc(tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32), dg_ptr + 2 * H,
                                  DW, prow, alive, whh_ptr + 2 * H * HS, HS, 1, cols, cm, H,
                                  PREC, BLOCK_K)
                    r = _load_rows(gates_ptr, GW, prow, 0, cols, m2)
                    hp = _load_rows(hprev_ptr, HS, prow, 0, cols, m2)
                    _store_rows(dg_ptr, DW, prow, 0, cols, drh * hp * r * (1.0 - r), m2)
                    _store_rows(dh_ptr, HS, rows, 0, cols,
                                _load_rows(dh_ptr, HS, rows, 0, cols, m2) + drh * r, m2)
            tl.debug_barrier()
            # Phase B: dh_{t-1} = direct + Σ_gates dG_g @ W_hh[g].
            for k0 in range(0, HS, BLOCK_H):
                kc = k0 + tl.arange(0, BLOCK_H)
                km = kc < HS
                mk = alive[:, None] & km[None, :]
                if MODE >= 3:
                    acc = _load_rows(dh_ptr, HS, rows, 0, kc, mk)
                else:
                    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                for g in tl.static_range(NG):
                    dcol = 3 * H if (MODE == 3 and g == 2) else g * H
                    acc = dot_acc(acc, dg_ptr + dcol, DW, prow, alive, whh_ptr + g * H * HS, HS,
                                  1, kc, km, H, PREC, BLOCK_K)
                _store_rows(dh_ptr, HS, rows, 0, kc, acc, mk)
            tl.debug_barrier()


def _schedule(batch_sizes: Tensor, reverse: bool, device) -> Tensor:
    """(5, T) int32 in processing order: rows alive, packed offset, offset of the previous
    step's rows, how many rows have a previous step, first row index that finishes here."""
    bs = [int(b) for b in batch_sizes.tolist()]
    T, B = len(bs), bs[0]
    off = [0] * T
    for t in range(1, T):
        off[t] = off[t - 1] + bs[t - 1]
    order = range(T - 1, -1, -1) if reverse else range(T)
    sched = []
    for t in order:
        if not reverse:
            prev_off, prev_bs = (off[t - 1], bs[t]) if t > 0 else (0, 0)
            fin = bs[t + 1] if t + 1 < T else 0
        else:
            prev_off, prev_bs = (off[t + 1], bs[t + 1]) if t + 1 < T else (0, 0)
            fin = 0 if t == 0 else B     # a reversed sequence ends at t = 0
        sched.append((bs[t], off[t], prev_off, prev_bs, fin))
    return torch.tensor(sched, dtype=torch.int32, device="cpu").t().contiguous().to(device)


def _dummy(x):
    return x.new_empty((1,))


def recurrent_forward(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_peep, w_hr,
                      reverse, save):
    """Same contract as the ``seqkern::recurrent_layer`` custom op: returns (out, h_n, c_n,
    ws_gates, ws_cells, ws_hprev), the ws_* empty unless save."""
    check_device(x)
    code = _MODE_CODE[mode]
    G = _GATES[code]
    H = w_hh.shape[0] // G
    Hs = h0.shape[1]
    N, B = x.shape[0], h0.shape[0]
    from seqkern.ops.rnn import _check_batch_sizes  # (not at import: ops imports this module)

    # the kernels' schedule trusts the layout: a wrong one would read and write past x and out
    _check_batch_sizes(batch_sizes, N, B)
    T = batch_sizes.shape[0]
    # computed, and saved for the backward, in the op's compute dtype (its fake says so)
    ct = registry.compute_dtype(x.dtype)
    # All steps' input projections in one matmul (fp32 accumulate; cuBLAS on GPU).
    xp = torch.addmm(b_ih.to(ct), x.to(ct), w_ih.to(ct).t()) if b_ih is not None \
        else x.to(ct) @ w_ih.to(ct).t()
    xp = xp.contiguous()
    lstm, proj = mode == "lstm", w_hr is not None
    out = x.new_empty((N, Hs))
    h_n = x.new_zeros((B, Hs))
    c_n = x.new_zeros((B, H)) if lstm else x.new_empty((0,))
    gates = x.new_empty((N, 4 * H if mode == "gru" else G * H) if G > 1 else (1,), dtype=ct)
    cells = x.new_empty((N, 3 * H if proj else 2 * H) if lstm else (1,), dtype=ct)
    hprev = x.new_empty((N, Hs), dtype=ct)
    scratch = x.new_empty((B, H) if mode == "gru_cho" else (1,), dtype=ct)
    sched = _schedule(batch_sizes, reverse, x.device)
    c0_ = c0.contiguous() if c0 is not None else _dummy(x)
    grid = (triton.cdiv(B, BLOCK_B),)
    _recurrent_forward_kernel[grid](
        xp, w_hh.contiguous(), b_hh.contiguous() if b_hh is not None else _dummy(x),
        w_peep.contiguous() if w_peep is not None else _dummy(x),
        w_hr.contiguous() if proj else _dummy(x), h0.contiguous(), c0_, sched,
        out, h_n, c_n if lstm else _dummy(x), gates, cells, hprev, scratch,
        T, H, Hs,
        MODE=code, HAS_BHH=b_hh is not None, HAS_PEEP=w_peep is not None, HAS_PROJ=proj,
        PREC=dot_precision(x.dtype), BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K)
    if not save:
        empty = x.new_empty((0,), dtype=ct)
        return out, h_n, c_n, empty, empty, empty
    return (out, h_n, c_n, gates if G > 1 else x.new_empty((0, G * H), dtype=ct),
            cells if lstm else x.new_empty((0, 2 * H), dtype=ct), hprev)


def _outputs_from_states(ws_hprev: Tensor, h_n: Tensor, batch_sizes: Tensor, reverse: bool) -> Tensor:
    """The layer's output rows, (N, Hs), rebuilt from what the forward saved (the output itself
    is not saved: see ops.rnn._saved_final_states): row m of step t is h_prev of the step after
    t in the forward's order, or h_n[m] where that step has no row m."""
    bs = batch_sizes.to(torch.int64).cpu()
    T, N = bs.shape[0], ws_hprev.shape[0]
    off = torch.cumsum(bs, 0) - bs
    nxt = torch.arange(T, device="cpu") + (-1 if reverse else 1)
    has = (nxt >= 0) & (nxt < T)
    nxt = nxt.clamp(0, T - 1)
    next_rows = torch.where(has, bs[nxt], torch.zeros_like(bs))
    step = torch.repeat_interleave(torch.arange(T, device="cpu"), bs)
    m = torch.arange(N, device="cpu") - off[step]
    src = torch.where(m < next_rows[step], off[nxt][step] + m, N + m)
    return torch.cat([ws_hprev, h_n.to(ws_hprev.dtype)]).index_select(0, src.to(ws_hprev.device))


def recurrent_backward(mode, grad_out, grad_hn, grad_cn, x, batch_sizes, w_ih, w_hh, b_ih, b_hh,
                       w_peep, w_hr, h_n, ws_gates, ws_cells, ws_hprev, reverse):
    """Same contract as ``seqkern::recurrent_layer_backward``: (dx, dh0, dc0, dw_ih, dw_hh,
    db_ih, db_hh, dw_peep, dw_hr), absent ones empty."""
    code = _MODE_CODE[mode]
    G = _GATES[code]
    H = w_hh.shape[0] // G
    Hs = ws_hprev.shape[1]
    N, B = x.shape[0], grad_hn.shape[0]
    T = batch_sizes.shape[0]
    ct = registry.compute_dtype(x.dtype)
    lstm, proj = mode == "lstm", w_hr is not None
    dh = grad_hn.to(ct).contiguous().clone()
    dc = (grad_cn.to(ct).contiguous().clone() if grad_cn is not None
          else x.new_zeros((B, H), dtype=ct)) if lstm else x.new_empty((1,), dtype=ct)
    dg = x.new_empty((N, 4 * H if mode == "gru" else G * H), dtype=ct)
    dhall = x.new_empty((N, Hs) if proj else (1,), dtype=ct)
    sched = _schedule(batch_sizes, reverse, x.device)
    grid = (triton.cdiv(B, BLOCK_B),)
    _recurrent_backward_kernel[grid](
        grad_out.contiguous() if grad_out is not None else _dummy(x), w_hh.contiguous(),
        w_peep.contiguous() if w_peep is not None else _dummy(x),
        w_hr.contiguous() if proj else _dummy(x),
        _outputs_from_states(ws_hprev, h_n, batch_sizes, reverse) if code <= 1 else _dummy(x),
        ws_gates if ws_gates.numel() else _dummy(x), ws_cells if ws_cells.numel() else _dummy(x),
        ws_hprev, sched, dh, dc, dg, dhall,
        T, H, Hs,
        MODE=code, HAS_GOUT=grad_out is not None, HAS_PEEP=w_peep is not None, HAS_PROJ=proj,
        PREC=dot_precision(x.dtype), BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K)
    # Weight gradients: large matmuls over all N packed rows, after the sequential part.
    if mode == "gru":
        dg_x = dg[:, :3 * H]
        dg_h = torch.cat([dg[:, :2 * H], dg[:, 3 * H:]], dim=1)
    else:
        dg_x = dg_h = dg
    hprev = ws_hprev.to(ct)
    dx = (dg_x @ w_ih.to(ct)).to(x.dtype)
    dw_ih = (dg_x.t() @ x.to(ct)).to(w_ih.dtype)
    if mode == "gru_cho":
        r = ws_gates[:, :H].to(ct)
        dw_hh = torch.cat([dg_h[:, :2 * H].t() @ hprev, dg_h[:, 2 * H:].t() @ (r * hprev)], 0)
    else:
        dw_hh = dg_h.t() @ hprev
    empty = x.new_empty((0,))
    db_ih = dg_x.sum(0).to(b_ih.dtype) if b_ih is not None else empty
    db_hh = dg_h.sum(0).to(b_hh.dtype) if b_hh is not None else empty
    if w_peep is not None:
        cells = ws_cells.to(ct)
        dw_peep = torch.stack([(dg[:, :H] * cells[:, :H]).sum(0),
                               (dg[:, H:2 * H] * cells[:, :H]).sum(0),
                               (dg[:, 3 * H:4 * H] * cells[:, H:2 * H]).sum(0)]).to(w_peep.dtype)
    else:
        dw_peep = empty
    dw_hr = (dhall.t() @ ws_cells[:, 2 * H:].to(ct)).to(w_hr.dtype) if proj else empty
    dh0 = dh.to(x.dtype)
    dc0 = dc.to(x.dtype) if lstm else empty
    return dx, dh0, dc0, dw_ih, dw_hh.to(w_hh.dtype), db_ih, db_hh, dw_peep, dw_hr


_WEIGHT_KEYS = ("w_ih", "w_hh", "b_ih", "b_hh", "w_peep", "w_hr")


class _RecurrentLayer(torch.autograd.Function):
    """Autograd for CPU tensors under the interpreter (on CUDA the custom op carries it)."""

    @staticmethod
    def forward(ctx, mode, reverse, x, batch_sizes, h0, c0, *weights):
        w = dict(zip(_WEIGHT_KEYS, weights))
        save = any(ctx.needs_input_grad[2:])
        out, h_n, c_n, ws_g, ws_c, ws_h = recurrent_forward(
            mode, x, batch_sizes, h0, c0, *weights, reverse, save)
        ctx.mode, ctx.reverse, ctx.has_c0 = mode, reverse, c0 is not None
        from seqkern.ops.rnn import _saved_final_states

        ctx.save_for_backward(x, batch_sizes, h0, _saved_final_states(mode, h_n), ws_g, ws_c,
                              ws_h, *weights)
        return out, h_n, (c_n if mode == "lstm" else None)

    @staticmethod
    def backward(ctx, g_out, g_hn, g_cn):
        if torch.is_grad_enabled():
            raise RuntimeError("seqkern recurrent layer: double backward is not supported")
        x, batch_sizes, h0, h_n, ws_g, ws_c, ws_h, *weights = ctx.saved_tensors
        if g_hn is None:
            g_hn = torch.zeros_like(h0)
        res = recurrent_backward(ctx.mode, g_out, g_hn, g_cn, x, batch_sizes, *weights, h_n,
                                 ws_g, ws_c, ws_h, ctx.reverse)
        dx, dh0, dc0, *dws = res
        dws = [d if w is not None else None for d, w in zip(dws, weights)]
        return (None, None, dx, None, dh0, dc0 if ctx.has_c0 else None, *dws)


def recurrent_layer(mode: str, x: Tensor, batch_sizes: Tensor, h0: Tensor, c0: Tensor | None,
                    weights: dict, reverse: bool = False):
    """The triton backend of ``seqkern.ops.recurrent_layer`` (arguments already checked)."""
    args = [weights.get(k) for k in _WEIGHT_KEYS]
    if x.device.type == "cuda":
        # On the GPU go through the registered custom op, so torch.compile sees one op.
        from seqkern.ops.rnn import _recurrent_layer_op

        save = _ext.needs_grad(x, h0, c0, *args)
        out, h_n, c_n, *_ = _recurrent_layer_op(mode, x, batch_sizes, h0, c0, *args, reverse,
                                                save)
        return out, h_n, (c_n if mode == "lstm" else None)
    return _RecurrentLayer.apply(mode, reverse, x, batch_sizes, h0, c0, *args)
