"""Recurrent suites: lstm, gru, rnn — inference forward and training forward+backward against
the torch.nn module with the same weights (float32, one layer, unidirectional); with --full also
the cells, a loop of T calls as a decoder runs them (CELL_GRID), inference and training."""
from __future__ import annotations

import torch

from seqkern.bench.case import Case

# (T, B, I, H), from the recurrent issue; the first four are the --quick grid.
GRID = [(50, 1, 128, 128), (100, 8, 256, 256), (100, 32, 256, 256), (500, 16, 64, 128),
        (200, 64, 512, 512), (64, 64, 1024, 1024)]
QUICK = 4
# (T, B, I, H) of the cell loops: T calls of the cell, state fed back
CELL_GRID = [(20, 1, 256, 256), (20, 16, 256, 256), (20, 64, 512, 512)]
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _modules(name: str, I: int, H: int, dtype: torch.dtype):
    import seqkern.nn as snn

    tcls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[name]
    scls = {"lstm": snn.LSTM, "gru": snn.GRU, "rnn": snn.RNN}[name]
    t = tcls(I, H).to(dtype)
    s = scls(I, H).to(dtype)
    s.load_state_dict(t.state_dict())
    return t, s


def _flops(name, T, B, I, H, train):
    f = 2.0 * T * B * GATES[name] * H * (I + H)
    return 3 * f if train else f


def _make(name, T, B, I, H, dtype, train):
    def make():
        from seqkern.reference import rnn as ref

        t, s = _modules(name, I, H, dtype)
        x = torch.randn(T, B, I, dtype=dtype, requires_grad=train)
        mode = {"lstm": "lstm", "gru": "gru", "rnn": "rnn_tanh"}[name]
        w = [{"w_ih": t.weight_ih_l0, "w_hh": t.weight_hh_l0, "b_ih": t.bias_ih_l0,
              "b_hh": t.bias_hh_l0}]
        h0 = torch.zeros(1, B, H, dtype=dtype)
        c0 = torch.zeros(1, B, H, dtype=dtype) if name == "lstm" else None

        def run_ref():
            return ref.recurrence(mode, x, h0, c0, w)[0]

        if train:
            def wrap(f):
                def g():
                    out = f()
                    out = out[0] if isinstance(out, tuple) else out
                    out.sum().backward()
                return g
            impls = {"seqkern": wrap(lambda: s(x)), "torch": wrap(lambda: t(x)),
                     "reference": wrap(run_ref)}
        else:
            def nograd(f):
                def g():
                    with torch.no_grad():
                        return f()
                return g
            impls = {"seqkern": nograd(lambda: s(x)), "torch": nograd(lambda: t(x)),
                     "reference": nograd(run_ref)}
        if T * B * H > 50 * 8 * 256:  # the per-step reference would take minutes here
            del impls["reference"]
        return impls
    return make


def _make_cell_loop(name, T, B, I, H, dtype, train):
    def make():
        import seqkern.nn as snn

        tcls = {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell, "rnn": torch.nn.RNNCell}[name]
        scls = {"lstm": snn.LSTMCell, "gru": snn.GRUCell, "rnn": snn.RNNCell}[name]
        t, s = tcls(I, H).to(dtype), scls(I, H).to(dtype)
        s.load_state_dict(t.state_dict())
        x = torch.randn(T, B, I, dtype=dtype)

        def loop(cell):
            def run():
                with torch.set_grad_enabled(train):
                    h = torch.zeros(B, H, dtype=dtype)
                    state = (h, torch.zeros(B, H, dtype=dtype)) if name == "lstm" else h
                    loss = 0
                    for i in range(T):
                        state = cell(x[i], state)
                        loss = loss + (state[0] if name == "lstm" else state).sum()
                    if train:
                        loss.backward()
            return run
        return {"seqkern": loop(s), "torch": loop(t)}
    return make


def cases(full: bool) -> list[Case]:
    out = []
    dtypes = [torch.float32, torch.bfloat16] if full else [torch.float32]
    grids = [(GRID, _make, "")] + ([(CELL_GRID, _make_cell_loop, "cell loop ")] if full else [])
    for grid, make, what in grids:
        for dtype in dtypes:
            for gi, (T, B, I, H) in enumerate(grid):
                for name in ("lstm", "gru", "rnn"):
                    for train in (False, True):
                        out.append(Case(
                            suite=name, op=f"{name} {what}{'fwd+bwd' if train else 'fwd'}",
                            shape={"T": T, "B": B, "I": I, "H": H}, dtype=dtype,
                            make=make(name, T, B, I, H, dtype, train),
                            flops=_flops(name, T, B, I, H, train),
                            quick=grid is GRID and gi < QUICK and dtype == torch.float32))
    return out
