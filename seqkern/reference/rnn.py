"""Reference recurrences: one cell function per SPEC equation, an explicit loop over time.

Sequences here are time-major and padded: x is (T, B, I) and ``lengths`` (B,) says how many
steps of each sequence exist. Step t of sequence b runs only if t < lengths[b]; otherwise the
state is carried unchanged and the output is zero, which is exactly PackedSequence semantics
for both directions (the reverse direction of sequence b starts at lengths[b] - 1).
"""
from __future__ import annotations

import torch
from torch import Tensor

MODES = ("rnn_tanh", "rnn_relu", "lstm", "gru", "gru_cho")


def gate_count(mode: str) -> int:
    return {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3, "gru_cho": 3}[mode]


def _linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    y = x @ w.t()
    return y if b is None else y + b


def rnn_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh"):
    a = _linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh)
    return torch.tanh(a) if nonlinearity == "tanh" else torch.relu(a)


def lstm_cell(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None, w_peep=None, w_hr=None):
    """One LSTM step; returns (h', c'). w_peep (3, H) holds p_i, p_f, p_o; w_hr (P, H) projects."""
    gi, gf, gg, go = (_linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh)).chunk(4, dim=-1)
    if w_peep is not None:
        gi = gi + w_peep[0] * c
        gf = gf + w_peep[1] * c
    i, f, g = torch.sigmoid(gi), torch.sigmoid(gf), torch.tanh(gg)
    c_new = f * c + i * g
    if w_peep is not None:
        go = go + w_peep[2] * c_new
    o = torch.sigmoid(go)
    h_new = o * torch.tanh(c_new)
    if w_hr is not None:
        h_new = h_new @ w_hr.t()
    return h_new, c_new


def gru_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None, reset_after=True):
    """One GRU step. reset_after=True: PyTorch/cuDNN (r multiplies W_hn h + b_hn);
    False: Cho et al. 2014 (r multiplies h before W_hn)."""
    xr, xz, xn = _linear(x, w_ih, b_ih).chunk(3, dim=-1)
    w_hr, w_hz, w_hn = w_hh.chunk(3, dim=0)
    b_hr, b_hz, b_hn = b_hh.chunk(3) if b_hh is not None else (None, None, None)
    r = torch.sigmoid(xr + _linear(h, w_hr, b_hr))
    z = torch.sigmoid(xz + _linear(h, w_hz, b_hz))
    if reset_after:
        n = torch.tanh(xn + r * _linear(h, w_hn, b_hn))
    else:
        n = torch.tanh(xn + _linear(r * h, w_hn, b_hn))
    return (1 - z) * n + z * h


def cell_step(mode, x, h, c, w_ih, w_hh, b_ih=None, b_hh=None, w_peep=None, w_hr=None):
    """One step of any mode; returns (h', c') with c' None except for LSTM."""
    if mode == "lstm":
        return lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh, w_peep, w_hr)
    if mode in ("gru", "gru_cho"):
        return gru_cell(x, h, w_ih, w_hh, b_ih, b_hh, reset_after=(mode == "gru")), None
    return rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, "tanh" if mode == "rnn_tanh" else "relu"), None


def layer(mode, x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_peep=None, w_hr=None,
          reverse=False, lengths=None):
    """One layer, one direction. x (T, B, I) → (out (T, B, Hs), h_n (B, Hs), c_n (B, H) | None)."""
    T, B = x.shape[0], x.shape[1]
    h, c = h0, c0
    outs = [None] * T
    steps = range(T - 1, -1, -1) if reverse else range(T)
    for t in steps:
        if lengths is None:
            h, c = cell_step(mode, x[t], h, c, w_ih, w_hh, b_ih, b_hh, w_peep, w_hr)
            outs[t] = h
        else:
            # Padded steps are selected away, not multiplied by 0, and their inputs zeroed
            # first: padding holding NaN or inf must not leak (0·NaN is NaN), forward or back.
            alive = (t < lengths).to(x.device).unsqueeze(1)  # (B, 1)
            xt = torch.where(alive, x[t], torch.zeros((), dtype=x.dtype, device=x.device))
            h_new, c_new = cell_step(mode, xt, h, c, w_ih, w_hh, b_ih, b_hh, w_peep, w_hr)
            h = torch.where(alive, h_new, h)
            if c is not None:
                c = torch.where(alive, c_new, c)
            outs[t] = torch.where(alive, h_new, torch.zeros((), dtype=h_new.dtype, device=h_new.device))
    return torch.stack(outs), h, c


def recurrence(mode, x, h0, c0, weights, num_layers=1, bidirectional=False, lengths=None,
               dropout=0.0, training=False):
    """Stacked (and optionally bidirectional) recurrence on padded time-major x (T, B, I).

    weights[layer * D + direction] = dict(w_ih, w_hh, b_ih, b_hh, w_peep, w_hr) (absent = None).
    h0 is (num_layers * D, B, Hs), c0 (num_layers * D, B, H) for LSTM. Returns (out, h_n, c_n).
    """
    D = 2 if bidirectional else 1
    hs, cs = [], []
    inp = x
    for k in range(num_layers):
        outs = []
        for d in range(D):
            idx = k * D + d
            w = weights[idx]
            out, h, c = layer(mode, inp, h0[idx], None if c0 is None else c0[idx],
                              w["w_ih"], w["w_hh"], w.get("b_ih"), w.get("b_hh"),
                              w.get("w_peep"), w.get("w_hr"), reverse=(d == 1), lengths=lengths)
            outs.append(out)
            hs.append(h)
            cs.append(c)
        inp = torch.cat(outs, dim=-1)
        if dropout > 0 and training and k < num_layers - 1:
            inp = torch.nn.functional.dropout(inp, dropout, training=True)
    return inp, torch.stack(hs), (torch.stack(cs) if c0 is not None else None)
