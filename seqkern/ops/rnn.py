"""Recurrent ops: the torch.library custom ops for one recurrent layer, and the multi-layer,
bidirectional, variable-length driver that modules call.

Sequences travel in packed layout (``PackedSequence.data`` with its ``batch_sizes``); a
time-major padded batch with equal lengths is the same memory with ``batch_sizes = [B] * T``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from seqkern import _ext, registry
from seqkern import triton as _triton_backend  # does not import triton itself
from seqkern.ops._autocast import autocast_op
from seqkern.reference import rnn as ref

__all__ = ["recurrent_layer", "recurrence", "cell_step", "MODES"]

MODES = ref.MODES
_CPU = torch.device("cpu")
_WEIGHT_KEYS = ("w_ih", "w_hh", "b_ih", "b_hh", "w_peep", "w_hr")


# ---------------------------------------------------------------- custom ops (C++ CPU) -----

@torch.library.custom_op("seqkern::recurrent_layer", mutates_args=(), device_types="cpu")
def _recurrent_layer_op(
    mode: str, x: Tensor, batch_sizes: Tensor, h0: Tensor, c0: Optional[Tensor], w_ih: Tensor,
    w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor], w_peep: Optional[Tensor],
    w_hr: Optional[Tensor], reverse: bool, save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, h_n, c_n, ws_gates, ws_cells, ws_hprev); the ws_* are what backward needs
    (empty unless save)."""
    return tuple(_ext._C.recurrent_forward(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                           w_peep, w_hr, reverse, save))


@_recurrent_layer_op.register_fake
def _(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_peep, w_hr, reverse, save):
    G = ref.gate_count(mode)
    H = w_hh.shape[0] // G
    N, B, Hs = x.shape[0], h0.shape[0], h0.shape[1]
    ct = registry.compute_dtype(x.dtype)
    lstm = mode == "lstm"
    gates_rows = N if save and G > 1 else 0
    gates_cols = 4 * H if mode == "gru" else G * H
    return (
        x.new_empty((N, Hs)),
        x.new_empty((B, Hs)),
        x.new_empty((B, H) if lstm else (0,)),
        x.new_empty((gates_rows, gates_cols), dtype=ct),
        x.new_empty((N if save and lstm else 0, 3 * H if w_hr is not None else 2 * H), dtype=ct),
        x.new_empty((N if save else 0, Hs), dtype=ct),
    )


def _backward_direct(mode, grad_out, grad_hn, grad_cn, x, *rest):
    """The C++ backward, with absent gradients as empty tensors (a custom op returns tensors)."""
    res = _ext._C.recurrent_backward(mode, grad_out, grad_hn, grad_cn, x, *rest)
    return tuple(r if r is not None else x.new_empty((0,)) for r in res)


@torch.library.custom_op("seqkern::recurrent_layer_backward", mutates_args=(), device_types="cpu")
def _recurrent_layer_backward_op(
    mode: str, grad_out: Optional[Tensor], grad_hn: Optional[Tensor], grad_cn: Optional[Tensor],
    x: Tensor, batch_sizes: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
    b_hh: Optional[Tensor], w_peep: Optional[Tensor], w_hr: Optional[Tensor], h_n: Tensor,
    ws_gates: Tensor, ws_cells: Tensor, ws_hprev: Tensor, reverse: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_peep, dw_hr); absent ones empty.
    h_n: the forward's final states, which the RNN cells' backward reads (see _saved_final_states)."""
    return _backward_direct(mode, grad_out, grad_hn, grad_cn, x, batch_sizes, w_ih, w_hh, b_ih,
                            b_hh, w_peep, w_hr, h_n, ws_gates, ws_cells, ws_hprev, reverse)


@_recurrent_layer_backward_op.register_fake
def _(mode, grad_out, grad_hn, grad_cn, x, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_peep, w_hr,
      h_n, ws_gates, ws_cells, ws_hprev, reverse):
    G = ref.gate_count(mode)
    H = w_hh.shape[0] // G
    B = grad_hn.shape[0] if grad_hn is not None else None
    Hs = ws_hprev.shape[1]
    if B is None:
        raise RuntimeError("seqkern: recurrent_layer_backward needs grad_hn (zeros if unused)")

    def like(t, shape):
        return x.new_empty(shape if t is not None else (0,), dtype=(t.dtype if t is not None else x.dtype))

    return (
        x.new_empty(x.shape),
        x.new_empty((B, Hs)),
        x.new_empty((B, H) if mode == "lstm" else (0,)),
        w_ih.new_empty(w_ih.shape),
        w_hh.new_empty(w_hh.shape),
        like(b_ih, (G * H,)),
        like(b_hh, (G * H,)),
        like(w_peep, (3, H)),
        like(w_hr, (Hs, H)),
    )


def _saved_final_states(mode: str, h_n: Tensor) -> Tensor:
    """What the backward of a layer is given for its final states: the RNN cells' derivative
    reads y_t, which is h_prev of the following step or, where a sequence ends, its final state
    (a copy: the caller may change h_n). The output itself is not saved, so it may be edited in
    place before backward, as torch's GRU and RNN allow; the gated cells read only their gates."""
    return h_n.clone() if mode in ("rnn_tanh", "rnn_relu") else h_n.new_empty((0,))


def _setup_context(ctx, inputs, output):
    mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_peep, w_hr, reverse, save = inputs
    _, h_n, _, ws_gates, ws_cells, ws_hprev = output
    ctx.mode, ctx.reverse, ctx.saved = mode, reverse, save
    ctx.has_c0 = c0 is not None
    ctx.save_for_backward(x, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, w_peep, w_hr,
                          _saved_final_states(mode, h_n), ws_gates, ws_cells, ws_hprev)


def _layer_grads(ctx, g_out, g_hn, g_cn, backward_fn):
    """The input gradients (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_peep, w_hr) of one layer."""
    if not ctx.saved:
        raise RuntimeError("seqkern.recurrent_layer: the forward ran without saving activations "
                           "(save=False), so it cannot be differentiated")
    if torch.is_grad_enabled():
        raise RuntimeError("seqkern.recurrent_layer: double backward is not supported")
    (x, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, w_peep, w_hr, h_n, ws_gates, ws_cells,
     ws_hprev) = ctx.saved_tensors
    if g_hn is None:
        g_hn = torch.zeros_like(h0)
    if ctx.mode != "lstm":  # c_n is an empty placeholder (by mode, not numel: B may be symbolic)
        g_cn = None
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_peep, dw_hr = backward_fn(
        ctx.mode, g_out, g_hn, g_cn, x, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_peep, w_hr, h_n,
        ws_gates, ws_cells, ws_hprev, ctx.reverse)
    return (dx, dh0, dc0 if ctx.has_c0 else None, dw_ih, dw_hh,
            db_ih if b_ih is not None else None, db_hh if b_hh is not None else None,
            dw_peep if w_peep is not None else None, dw_hr if w_hr is not None else None)


def _backward(ctx, g_out, g_hn, g_cn, *_unused):
    dx, dh0, dc0, *dw = _layer_grads(ctx, g_out, g_hn, g_cn, _recurrent_layer_backward_op)
    return (None, dx, None, dh0, dc0, *dw, None, None)


_recurrent_layer_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerLayer(torch.autograd.Function):
    """The same forward and backward kernels as the custom ops, for eager training.

    Going through the custom op costs its Python dispatch twice per layer (argument
    normalisation, schema checks): measured ~0.3 ms of a 1.3 ms training step of a T = 50,
    B = 1 RNN. Under torch.compile, and wherever a graph is traced, the custom op is used."""

    @staticmethod
    def forward(ctx, mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_peep, w_hr, reverse):
        out, h_n, c_n, ws_gates, ws_cells, ws_hprev = _ext._C.recurrent_forward(
            mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_peep, w_hr, reverse, True)
        _setup_context(ctx, (mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_peep,
                             w_hr, reverse, True), (out, h_n, c_n, ws_gates, ws_cells, ws_hprev))
        if mode != "lstm":
            ctx.mark_non_differentiable(c_n)
        return out, h_n, c_n

    @staticmethod
    def backward(ctx, g_out, g_hn, g_cn):
        # batched gradients (is_grads_batched, jacobian(vectorize=True)) arrive under vmap,
        # which only the custom op can take
        direct = _ext.direct_call_ok(g_out, g_hn, g_cn) and not _ext.batched(g_out, g_hn, g_cn)
        dx, dh0, dc0, *dw = _layer_grads(ctx, g_out, g_hn, g_cn, _backward_direct if direct
                                         else _recurrent_layer_backward_op)
        return (None, dx, None, dh0, dc0, *dw, None)


# ---------------------------------------------------------------- cells in training ---------
#
# A loop of cell calls (a decoder trained step by step) used to pay, per step and per weight,
# a weight gradient written out whole and then added into the one autograd accumulates: at
# B = 1, H = 256 that memory traffic was most of a step's backward, in torch as well. Here
# the steps of a chain (each step's h or c fed to the next call) share one _WeightTap node
# between the weights and the steps: each step's backward leaves its gate gradients and
# inputs on the chain's _StepTape, and the tap, which autograd runs once every step that
# reached it is done, turns them into each weight's gradient with one product over all steps.
# A weight gradient of exactly the steps the pass went through, as torch's: the tap only runs
# once every step that reached it has recorded.


class _StepTape:
    """A chain's gate gradients and step inputs, per backward pass (graph task: passes in other
    threads, or one that stops short of the weights, such as autograd.grad with respect to h0
    alone, keep apart). A pass's entries are dropped when it ends, reached the weights or not."""

    __slots__ = ("passes", "weights", "versions", "grads")

    def __init__(self, weights):
        self.passes = {}  # graph task id → (gx, grec, x, h) lists
        self.weights = weights  # (w_ih, w_hh, b_ih, b_hh): the tensors the chain started on
        self.versions = tuple(w._version if w is not None else 0 for w in weights)
        self.grads = tuple(w is not None and w.requires_grad for w in weights)

    def fits(self, weights) -> bool:
        """Whether a step on `weights` may join the chain: the same tensors, not modified since,
        and wanting gradients for the same ones (the tap's are fixed when the chain starts)."""
        return (all(a is b for a, b in zip(self.weights, weights))
                and self.versions == tuple(w._version if w is not None else 0 for w in weights)
                and self.grads == tuple(w is not None and w.requires_grad for w in weights))

    def record(self, gx, grec, x, h):
        task = torch._C._current_graph_task_id()
        entries = self.passes.get(task)
        if entries is None:
            entries = self.passes[task] = ([], [], [], [])
            torch.autograd.Variable._execution_engine.queue_callback(
                lambda: self.passes.pop(task, None))
        for lst, t in zip(entries, (gx, grec, x, h)):
            lst.append(t)

    def take(self):
        """(gx, grec, x, h) of this pass's steps stacked, or None; the entries are dropped."""
        entries = self.passes.pop(torch._C._current_graph_task_id(), None)
        if not entries or not entries[0]:
            return None
        gx, grec, x, h = entries
        same = grec[0] is gx[0]  # (LSTM and RNN: one gradient for both products)

        def stack(ts):  # (None: an input the weights wanting gradients do not need)
            return None if ts[0] is None else torch.cat(ts) if len(ts) > 1 else ts[0]
        gx = stack(gx)
        return gx, gx if same else stack(grec), stack(x), stack(h)


# A state tensor's chain ((tape, tok); for a layer module's step(), the list of its layers'
# chains) is kept in the metadata of the autograd node that made it, not in the tensor's
# __dict__, which deepcopy, pickle and torch.save would carry along; a state detached (in place
# too) has no node, and starts a new chain.
_CHAIN_KEY = "seqkern_chain"


def chain_of(*states):
    """The chain of the first of these state tensors that has one, or None."""
    for t in states:
        fn = t.grad_fn if t is not None else None
        if fn is not None:
            chain = fn.metadata.get(_CHAIN_KEY)
            if chain is not None:
                return chain
    return None


def set_chain(chain, *states) -> None:
    for t in states:
        if t is not None and t.grad_fn is not None:
            t.grad_fn.metadata[_CHAIN_KEY] = chain


class _WeightTap(torch.autograd.Function):
    """weights → a scalar token every step of a chain takes as an input (its value is unused):
    in the backward, the weight gradients of all the chain's steps (see _StepTape)."""

    @staticmethod
    def forward(ctx, tape, w_ih, w_hh, b_ih, b_hh):
        ctx.tape, ctx.dtype = tape, w_ih.dtype
        return w_ih.new_zeros(())

    @staticmethod
    def backward(ctx, _g):
        taken = ctx.tape.take()
        if taken is None:
            return None, None, None, None, None
        return (None, *_weight_grads(*taken, ctx.dtype, ctx.needs_input_grad[1:]))


def _weight_grads(gx, grec, x, h, dtype, need):
    """(dW_ih, dW_hh, db_ih, db_hh) from the gate gradients and the steps' inputs, in `dtype`.
    bf16 steps' gate gradients are fp32: the weight products take them rounded to bf16 (bf16
    GEMMs accumulate in fp32 and round once; in fp32 they took 3× as long), the bias sums
    don't."""
    io = x if x is not None else h  # (x or h is None where no gradient needs it)
    if io is not None and gx.dtype != io.dtype:
        gx_m = gx.to(io.dtype)
        grec_m = gx_m if grec is gx else grec.to(io.dtype)
    else:
        gx_m, grec_m = gx, grec
    out = (gx_m.t().mm(x) if need[0] else None, grec_m.t().mm(h) if need[1] else None,
           gx.sum(0) if need[2] else None, grec.sum(0) if need[3] else None)
    return tuple(g.to(dtype) if g is not None and g.dtype != dtype else g for g in out)


def _cell_backward_math(mode, g_h, g_c, saved, h, c, w_ih, w_hh, need_dx):
    """cell_backward in torch ops (for gradients that arrive batched under vmap, which the C++
    kernel cannot take): (dgx, drec, dx or None, dh, dc or None)."""
    H = h.shape[1]
    dc = None
    if saved.dtype != h.dtype:  # (bf16 steps: fp32 math, as the kernel's)
        f = saved.dtype
        g_h, h, w_ih, w_hh = g_h.to(f), h.to(f), w_ih.to(f), w_hh.to(f)
        g_c, c = (t.to(f) if t is not None else None for t in (g_c, c))
    if mode.startswith("rnn"):
        y = saved
        dgx = g_h * (1 - y * y) if mode == "rnn_tanh" else g_h * (y > 0)
        drec, dh_direct = dgx, None
    elif mode == "lstm":
        i, f, g, o, c_n = saved.split(H, 1)
        tc = torch.tanh(c_n)
        do = g_h * tc * o * (1 - o)
        dct = g_h * o * (1 - tc * tc) + (g_c if g_c is not None else 0)
        dgx = torch.cat([dct * g * i * (1 - i), dct * c * f * (1 - f), dct * i * (1 - g * g), do], 1)
        drec, dh_direct, dc = dgx, None, dct * f
    else:  # gru
        r, z, n, hlin, h = saved.split(H, 1)
        dn = g_h * (1 - z) * (1 - n * n)
        dz = g_h * (h - n) * z * (1 - z)
        dr = dn * hlin * r * (1 - r)
        dgx = torch.cat([dr, dz, dn], 1)
        drec, dh_direct = torch.cat([dr, dz, dn * r], 1), g_h * z
    dh = drec.mm(w_hh) if dh_direct is None else torch.addmm(dh_direct, drec, w_hh)
    return dgx, drec, dgx.mm(w_ih) if need_dx else None, dh, dc


class _CellStep(torch.autograd.Function):
    """One training step of a cell on the C++ kernels (cell_step with saved activations,
    cell_backward); the weight gradients go to the chain's tape (tok from _WeightTap)."""

    @staticmethod
    def forward(ctx, mode, tape, tok, x, h, c, w_ih, w_hh, b_ih, b_hh):
        h_n, c_n, saved = _ext._C.cell_step(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, True)
        ctx.mode, ctx.tape = mode, tape
        ctx.has_c = c is not None
        # Not the outputs (a caller may reset a state in place between steps, as with torch's
        # cells), and x and h only where a weight gradient needs them
        need = ctx.needs_input_grad
        ctx.save_for_backward(x if need[6] else None, h if need[7] else None, c, w_ih, w_hh,
                              saved)
        if mode != "lstm":
            ctx.mark_non_differentiable(c_n)
        return h_n, c_n

    @staticmethod
    def backward(ctx, g_h, g_c):
        if torch.is_grad_enabled():
            raise RuntimeError("seqkern cells: double backward is not supported")
        x, h, c, w_ih, w_hh, saved = ctx.saved_tensors
        mode, need = ctx.mode, ctx.needs_input_grad
        lstm = mode == "lstm"
        if g_h is None:
            g_h = torch.zeros((saved.shape[0], w_hh.shape[1]), dtype=w_hh.dtype, device=w_hh.device)
        g_c = g_c if lstm else None
        h_arg = h if h is not None else g_h  # (cell_backward takes its shape only)
        direct = _ext.direct_call_ok(g_h, g_c) and not _ext.batched(g_h, g_c)
        if direct:
            dgx, drec, dx, dh, dc = _ext._C.cell_backward(mode, g_h, g_c, saved, h_arg, c, w_ih,
                                                          w_hh, need[3])
        else:
            dgx, drec, dx, dh, dc = _cell_backward_math(mode, g_h, g_c, saved, h_arg, c, w_ih,
                                                        w_hh, need[3])
        dw = [None] * 4
        if any(need[6:10]):
            if direct and ctx.tape is not None:
                ctx.tape.record(dgx, drec, x.detach() if x is not None else None,
                                h.detach() if h is not None and need[7] else None)
            else:
                dw = list(_weight_grads(dgx, drec, x, h, w_ih.dtype, need[6:10]))
        tok_grad = torch.zeros((), dtype=w_hh.dtype, device=w_hh.device) if ctx.tape is not None else None
        return (None, None, tok_grad, dx if need[3] else None, dh,
                dc if ctx.has_c else None, *dw)


# ---- the same step as custom ops: what torch.compile, torch.export and other graph capture
# take (each step's weight gradients formed and summed as torch's are; no chain there)


@torch.library.custom_op("seqkern::cell_step", mutates_args=(), device_types="cpu")
def _cell_step_op(mode: str, x: Tensor, h: Tensor, c: Optional[Tensor], w_ih: Tensor,
                  w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
                  save: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(h', c' (LSTM; else empty), saved (what the backward needs; empty unless save))."""
    return tuple(_ext._C.cell_step(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, save))


@_cell_step_op.register_fake
def _(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, save):
    B, H = h.shape
    saved_dt = torch.float32 if x.dtype == torch.bfloat16 else x.dtype
    width = {"lstm": 5 * H, "gru": 5 * H}.get(mode, H)
    return (x.new_empty((B, H)), x.new_empty((B, H) if mode == "lstm" else (0,)),
            x.new_empty((B, width) if save else (0,), dtype=saved_dt))


@torch.library.custom_op("seqkern::cell_backward", mutates_args=(), device_types="cpu")
def _cell_backward_op(mode: str, g_h: Tensor, g_c: Optional[Tensor], saved: Tensor, h: Tensor,
                      c: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
                      need_dx: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dgx, drec (GRU; else empty: it is dgx), dx (empty unless need_dx), dh, dc (LSTM; else
    empty))."""
    dgx, drec, dx, dh, dc = _ext._C.cell_backward(mode, g_h, g_c, saved, h, c, w_ih, w_hh,
                                                  need_dx)
    return dgx, (drec if mode == "gru" else dgx.new_empty((0,))), dx, dh, dc


@_cell_backward_op.register_fake
def _(mode, g_h, g_c, saved, h, c, w_ih, w_hh, need_dx):
    B, H = h.shape
    G = ref.gate_count(mode)
    ct = torch.float32 if h.dtype == torch.bfloat16 else h.dtype
    return (h.new_empty((B, G * H), dtype=ct),
            h.new_empty((B, G * H) if mode == "gru" else (0,), dtype=ct),
            h.new_empty((B, w_ih.shape[1]) if need_dx else (0,)), h.new_empty((B, H)),
            h.new_empty((B, H) if mode == "lstm" else (0,)))


def _cell_step_setup(ctx, inputs, output):
    mode, x, h, c, w_ih, w_hh, b_ih, b_hh, save = inputs
    h_n, c_n, saved = output
    ctx.mode, ctx.saved = mode, save
    ctx.has = (c is not None, b_ih is not None, b_hh is not None)
    ctx.save_for_backward(x, h, c, w_ih, w_hh, saved)


def _cell_step_backward(ctx, g_h, g_c, _g_saved):
    if not ctx.saved:
        raise RuntimeError("seqkern cell_step: the forward ran without saving activations "
                           "(save=False), so it cannot be differentiated")
    x, h, c, w_ih, w_hh, saved = ctx.saved_tensors
    mode = ctx.mode
    lstm = mode == "lstm"
    if g_h is None:
        g_h = torch.zeros_like(h)
    if lstm and g_c is None:
        g_c = torch.zeros_like(h)
    dgx, drec, dx, dh, dc = _cell_backward_op(mode, g_h, g_c if lstm else None, saved, h, c,
                                              w_ih, w_hh, True)
    if mode != "gru":
        drec = dgx
    has_c, has_bi, has_bh = ctx.has
    dw_ih, dw_hh, db_ih, db_hh = _weight_grads(dgx, drec, x, h, w_ih.dtype,
                                               (True, True, has_bi, has_bh))
    return (None, dx, dh, dc if lstm and has_c else None, dw_ih, dw_hh, db_ih, db_hh, None)


_cell_step_op.register_autograd(_cell_step_backward, setup_context=_cell_step_setup)


_CELL_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def cell_step_applies(mode: str, x: Tensor, h: Tensor, c: Tensor | None, params: dict) -> bool:
    """Whether a cell call (x (B, I), states (B, H), the cell's parameters) may run on
    cell_step: float32/float64/bfloat16 on the cpu backend in eager mode, plain tensors, not
    Cho's GRU,
    the states and the first parameter of x's dtype on the CPU. This runs on every call, so
    only the first parameter is looked at (~0.7 µs per tensor): the kernel checks every operand
    and raises a clear error for a module whose parameters disagree."""
    if mode == "gru_cho" or x.dtype not in _CELL_DTYPES or not x.is_cpu:
        return False
    tensors = (x, h, c, *params.values())
    if not _ext.direct_call_ok(*tensors) or _ext.batched(*tensors):
        return False
    first = next(iter(params.values()))
    if any(t is not None and (t.dtype != x.dtype or not t.is_cpu) for t in (h, c, first)):
        return False
    return registry.select("rnn", _CPU) == "cpu"


def cell_step_op_applies(mode: str, x: Tensor) -> bool:
    """Whether a cell call being captured in a graph (torch.compile, export) may run on the
    seqkern::cell_step custom op: a CPU float32/float64/bfloat16 input, not Cho's GRU, the cpu
    backend (the op checks the other operands)."""
    return (mode != "gru_cho" and x.dtype in _CELL_DTYPES and x.device.type == "cpu"
            and registry.select("rnn", _CPU) == "cpu")


def cell_step_captured(mode: str, x: Tensor, h: Tensor, c: Tensor | None, w: tuple):
    """(h', c' or None) of one cell step through the custom op (see cell_step_op_applies)."""
    save = _ext.needs_grad(x, h, c, *w)
    h_n, c_n, _ = _cell_step_op(mode, x, h, c, *w, save)
    return h_n, (c_n if mode == "lstm" else None)


def cell_step(mode: str, x: Tensor, h: Tensor, c: Tensor | None, w: tuple, chain=None):
    """(h', c' or None) of one cell step (see cell_step_applies), w = (w_ih, w_hh, b_ih or
    None, b_hh or None). Steps whose h or c came from an earlier step on the same, unmodified
    weights join its chain (found on h or c, or passed as `chain` by a caller that reshaped
    them), so that their weight gradients are summed in one product (see _StepTape)."""
    if not _ext.needs_grad(x, h, c, *w):
        h_n, c_n, _ = _ext._C.cell_step(mode, x, h, c, *w, False)
        return h_n, (c_n if mode == "lstm" else None)
    tape = tok = None
    if any(t is not None and t.requires_grad for t in w):
        if chain is None:
            chain = chain_of(h, c)
        if isinstance(chain, tuple) and chain[0].fits(w):
            tape, tok = chain
        else:
            tape = _StepTape(w)
            tok = _WeightTap.apply(tape, *w)
    h_n, c_n = _CellStep.apply(mode, tape, tok, x, h, c, *w)
    if tape is not None:
        set_chain((tape, tok), h_n, c_n if mode == "lstm" else None)
    return h_n, (c_n if mode == "lstm" else None)


if _ext._C is not None:
    registry.register("rnn", "cpu")

# triton backend: registered (and the CUDA kernels of the two ops above) only if installed.
_triton_backend.install("rnn", _recurrent_layer_op, _recurrent_layer_backward_op)


# ---------------------------------------------------------------- packing helpers ----------

def lengths_from_batch_sizes(batch_sizes: Tensor) -> Tensor:
    B = int(batch_sizes[0])
    return (batch_sizes.unsqueeze(1) > torch.arange(B, device=batch_sizes.device).unsqueeze(0)).sum(0)


def _padded_rows(batch_sizes: Tensor, device) -> Tensor | None:
    """The rows of a (T·B) padded layout that the packed rows fill, in packed order (time-major,
    the first batch_sizes[t] sequences of each step); None when every step has all B."""
    B = int(batch_sizes[0])
    if bool((batch_sizes == B).all()):
        return None
    filled = torch.arange(B, device=batch_sizes.device) < batch_sizes.unsqueeze(1)
    return filled.flatten().nonzero().squeeze(1).to(device)


def _pack_rows(x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x (T, B, F) padded, time-major, lengths (B,) int64 on the CPU → the fields of torch's
    pack_padded_sequence(x, lengths, enforce_sorted=False) (data, batch_sizes, sorted_indices,
    unsorted_indices), plus the flat t·B + b row of x each packed row came from. Plain tensor
    ops, so it also runs under torch.func transforms (torch's packing does not)."""
    T, B = x.shape[0], x.shape[1]
    sorted_lengths, sorted_idx = torch.sort(lengths, descending=True)
    steps = torch.arange(int(sorted_lengths[0]), device=lengths.device)
    batch_sizes = (sorted_lengths.unsqueeze(0) > steps.unsqueeze(1)).sum(1)
    filled = torch.arange(B, device=lengths.device).unsqueeze(0) < batch_sizes.unsqueeze(1)
    rows = (steps.unsqueeze(1) * B + sorted_idx.unsqueeze(0))[filled].to(x.device)
    unsorted_idx = torch.empty_like(sorted_idx).scatter_(0, sorted_idx, torch.arange(B, device=lengths.device))
    return (x.reshape(T * B, x.shape[2]).index_select(0, rows), batch_sizes,
            sorted_idx.to(x.device), unsorted_idx.to(x.device), rows)


@torch.library.custom_op("seqkern::pack_by_lengths", mutates_args=())
def _pack_by_lengths_op(x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """_pack_rows as one op, for torch.compile: the packed row count and the number of steps
    are data-dependent (its fake gives them as unbacked sizes), which traced tensor code cannot
    express. Checks the lengths, which a traced caller cannot do without a graph break."""
    T, B = x.shape[0], x.shape[1]
    if lengths.shape != (B,) or lengths.dtype != torch.int64:
        raise ValueError(f"lengths must be int64 of shape ({B},), got {lengths.dtype} "
                         f"{tuple(lengths.shape)}")
    if B == 0:
        raise ValueError("pack_by_lengths needs a non-empty batch")
    if int(lengths.min()) < 1 or int(lengths.max()) > T:
        raise ValueError(f"lengths must lie in [1, T={T}], got min {int(lengths.min())} max "
                         f"{int(lengths.max())}")
    return _pack_rows(x, lengths.cpu())


@_pack_by_lengths_op.register_fake
def _(x, lengths):
    ctx = torch.library.get_ctx()
    T, B = x.shape[0], x.shape[1]
    n = ctx.new_dynamic_size()  # packed rows, Σ lengths (≤ T·B)
    steps = ctx.new_dynamic_size()  # max(lengths) (≤ T)
    return (x.new_empty((n, x.shape[2])), lengths.new_empty((steps,), device="cpu"),
            lengths.new_empty((B,), device=x.device), lengths.new_empty((B,), device=x.device),
            lengths.new_empty((n,), device=x.device))


def _pack_by_lengths_backward(ctx, g_data, *_):
    T, B = ctx.shape
    return _unpack_rows(g_data, ctx.saved_tensors[0], T, B), None


def _pack_by_lengths_setup(ctx, inputs, output):
    ctx.shape = tuple(inputs[0].shape[:2])
    ctx.save_for_backward(output[4])
    ctx.mark_non_differentiable(*output[1:])


_pack_by_lengths_op.register_autograd(_pack_by_lengths_backward,
                                      setup_context=_pack_by_lengths_setup)


@torch.library.custom_op("seqkern::zero_states", mutates_args=())
def _zero_states_op(batch_sizes: Tensor, like: Tensor, layers: int, h_width: int,
                    c_width: int) -> tuple[Tensor, Tensor]:
    """Zero initial states (layers, B, h_width) and (layers, B, c_width) for a packed batch,
    B = batch_sizes[0]: under torch.compile a value read from a tensor, which only an op (whose
    fake gives B as an unbacked size) can turn into a shape without a graph break."""
    B = int(batch_sizes[0])
    return like.new_zeros(layers, B, h_width), like.new_zeros(layers, B, c_width)


@_zero_states_op.register_fake
def _(batch_sizes, like, layers, h_width, c_width):
    B = torch.library.get_ctx().new_dynamic_size()
    return like.new_empty((layers, B, h_width)), like.new_empty((layers, B, c_width))


def _unpack_rows(data: Tensor, rows: Tensor, T: int, B: int) -> Tensor:
    """Packed rows back into a padded (T, B, F) layout at their flat rows (from _pack_rows or
    _padded_rows), zeros past each sequence's length."""
    return data.new_zeros(T * B, data.shape[1]).index_copy(0, rows, data).view(T, B, -1)


def _check_batch_sizes(batch_sizes: Tensor, rows: int, B: int) -> None:
    """The C++ kernels' checks of a packed layout, for the reference path."""
    if batch_sizes.dim() != 1 or batch_sizes.numel() == 0 or batch_sizes.is_floating_point():
        raise ValueError(f"batch_sizes must be a non-empty 1-D integer tensor, got "
                         f"{batch_sizes.dtype} of shape {tuple(batch_sizes.shape)}")
    if (bool((batch_sizes < 1).any()) or bool((batch_sizes[1:] > batch_sizes[:-1]).any())
            or int(batch_sizes[0]) != B):
        raise ValueError(f"batch_sizes must be positive, non-increasing and start at the batch "
                         f"size {B}, got {batch_sizes.tolist()}")
    if int(batch_sizes.sum()) != rows:
        raise ValueError(f"batch_sizes sum to {int(batch_sizes.sum())} but x has {rows} rows")


def _reference_layer(mode, x, batch_sizes, h0, c0, w, reverse):
    _check_batch_sizes(batch_sizes, x.shape[0], h0.shape[0])
    # (plain tensor ops rather than pad_packed_sequence, which cannot run under torch.func's
    # transforms: the reference is what runs there)
    T, B = len(batch_sizes), int(batch_sizes[0])
    rows = _padded_rows(batch_sizes, x.device)
    padded = x.reshape(T, B, -1) if rows is None else _unpack_rows(x, rows, T, B)
    lengths = None if rows is None else lengths_from_batch_sizes(batch_sizes).to(x.device)
    out, h, c = ref.layer(mode, padded, h0, c0, w["w_ih"], w["w_hh"], w.get("b_ih"), w.get("b_hh"),
                          w.get("w_peep"), w.get("w_hr"), reverse=reverse, lengths=lengths)
    out = out.reshape(T * B, -1)
    return (out if rows is None else out.index_select(0, rows)), h, c


# ---------------------------------------------------------------- public API ---------------

def _check_layer(mode, x, batch_sizes, h0, c0, w):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    G = ref.gate_count(mode)
    w_ih, w_hh = w["w_ih"], w["w_hh"]
    if x.dim() != 2:
        raise ValueError(f"x must be packed (N, input_size), got shape {tuple(x.shape)}")
    if w_ih.dim() != 2 or w_ih.shape[1] != x.shape[1] or w_ih.shape[0] % G:
        raise ValueError(f"w_ih must be ({G}*hidden_size, {x.shape[1]}), got {tuple(w_ih.shape)}")
    H = w_ih.shape[0] // G
    w_hr = w.get("w_hr")
    if w_hr is not None and (w_hr.dim() != 2 or w_hr.shape[0] < 1 or w_hr.shape[1] != H):
        raise ValueError(f"w_hr must be (proj_size, {H}), got {tuple(w_hr.shape)}")
    Hs = w_hr.shape[0] if w_hr is not None else H
    if w_hr is not None and w_hh.dim() == 2 and w_hh.shape[0] == G * H and w_hh.shape[1] != Hs:
        # both carry proj_size: name both
        raise ValueError(f"w_hh {tuple(w_hh.shape)} and w_hr {tuple(w_hr.shape)} disagree on "
                         f"proj_size: w_hh must be ({G * H}, {Hs}) for this w_hr, or w_hr "
                         f"({w_hh.shape[1]}, {H}) for this w_hh")
    if tuple(w_hh.shape) != (G * H, Hs):
        raise ValueError(f"w_hh must be ({G * H}, {Hs}), got {tuple(w_hh.shape)}")
    # The batch size is h0's: reading batch_sizes[0] here would be data-dependent under
    # torch.compile; the kernel checks batch_sizes[0] == h0.shape[0].
    if h0.dim() != 2 or h0.shape[1] != Hs:
        raise ValueError(f"h0 must be (batch, {Hs}), got {tuple(h0.shape)}")
    B = h0.shape[0]
    if mode == "lstm" and (c0 is None or tuple(c0.shape) != (B, H)):
        raise ValueError(f"c0 must be ({B}, {H}), got {None if c0 is None else tuple(c0.shape)}")
    for name, t in [("h0", h0), ("c0", c0)] + [(k, w.get(k)) for k in _WEIGHT_KEYS]:
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise TypeError(f"{name} must have x's dtype and device ({x.dtype}, {x.device}), "
                            f"got ({t.dtype}, {t.device})")


@autocast_op
def recurrent_layer(mode: str, x: Tensor, batch_sizes: Tensor, h0: Tensor, c0: Tensor | None,
                    weights: dict, reverse: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer, one direction over a packed sequence.

    ``weights`` has w_ih, w_hh and optionally b_ih, b_hh, w_peep (3, H; LSTM), w_hr (P, H; LSTM).
    Returns (out (N, Hs), h_n (B, Hs), c_n (B, H) or None).
    """
    _check_layer(mode, x, batch_sizes, h0, c0, weights)
    return _run_layer(registry.select("rnn", x.device, x.dtype), mode, x, batch_sizes, h0, c0,
                      weights, reverse)


def _run_layer(backend, mode, x, batch_sizes, h0, c0, weights, reverse):
    if backend == "reference":
        return _reference_layer(mode, x, batch_sizes, h0, c0, weights, reverse)
    if backend == "triton":
        from seqkern.triton import rnn as triton_rnn

        return triton_rnn.recurrent_layer(mode, x, batch_sizes, h0, c0, weights, reverse)
    args = [weights.get(k) for k in _WEIGHT_KEYS]
    save = _ext.needs_grad(x, h0, c0, *args)
    if not _ext.direct_call_ok(x, batch_sizes, h0, c0, *args):
        out, h_n, c_n, *_ = _recurrent_layer_op(mode, x, batch_sizes, h0, c0, *args, reverse, save)
    elif save:
        out, h_n, c_n = _EagerLayer.apply(mode, x, batch_sizes, h0, c0, *args, reverse)
    else:
        # Eager inference: nothing to record for autograd or a graph, so skip the custom op's
        # Python dispatch (tens of microseconds, which matters for cells and streaming steps).
        out, h_n, c_n, *_ = _ext._C.recurrent_forward(mode, x, batch_sizes, h0, c0, *args,
                                                      reverse, False)
    return out, h_n, (c_n if mode == "lstm" else None)


@autocast_op
def recurrence(mode: str, data: Tensor, batch_sizes: Tensor, h0: Tensor, c0: Tensor | None,
               weights: Sequence[dict], num_layers: int = 1, bidirectional: bool = False,
               dropout: float = 0.0, training: bool = False):
    """Stacked, optionally bidirectional recurrence over a packed sequence.

    weights[layer * D + direction] are per-layer dicts as in ``recurrent_layer``; h0 is
    (num_layers * D, B, Hs). Returns (out (N, D * Hs), h_n, c_n or None), h_n layer-major.
    """
    return _recurrence(mode, data, batch_sizes, h0, c0, weights, num_layers, bidirectional,
                       dropout, training, check=True)


def _recurrence(mode, data, batch_sizes, h0, c0, weights, num_layers, bidirectional, dropout,
                training, check):
    """recurrence(); with check=False the per-layer Python checks are skipped (seqkern.nn's
    modules, whose weights have their shapes by construction and which check the input and
    the state themselves: at B = 1 these checks were ~10 % of a 50-step call). The kernels
    still check every operand."""
    D = 2 if bidirectional else 1
    if len(weights) != num_layers * D:
        raise ValueError(f"expected {num_layers * D} weight sets, got {len(weights)}")
    backend = registry.select("rnn", data.device, data.dtype)
    hs, cs = [], []
    inp = data
    for k in range(num_layers):
        outs = []
        for d in range(D):
            idx = k * D + d
            c0_l = None if c0 is None else c0[idx]
            if check:
                _check_layer(mode, inp, batch_sizes, h0[idx], c0_l, weights[idx])
            out, h, c = _run_layer(backend, mode, inp, batch_sizes, h0[idx], c0_l, weights[idx],
                                   d == 1)
            outs.append(out)
            hs.append(h)
            cs.append(c)
        inp = outs[0] if D == 1 else torch.cat(outs, dim=1)
        if dropout > 0 and training and k < num_layers - 1:
            inp = torch.nn.functional.dropout(inp, dropout, training=True)
    if len(hs) == 1:
        return inp, hs[0].unsqueeze(0), (cs[0].unsqueeze(0) if mode == "lstm" else None)
    return inp, torch.stack(hs), (torch.stack(cs) if mode == "lstm" else None)
