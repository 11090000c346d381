"""Causal dilated convolution ops: argument checks, the torch.library custom ops over the C++
kernels (with fake and autograd registrations), backend dispatch, and the single-step
(streaming) updates that modules use for generation.

State convention (SPEC.md, "Streaming"): a conv layer's state is the last P = (K−1)·d input
columns, oldest first, shape (B, C_in, P). Running a sequence in chunks with the state carried
equals running it in one call.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from seqkern import _ext, registry
from seqkern import triton as _triton_backend  # does not import triton itself
from seqkern.ops._autocast import autocast_op
from seqkern.reference import conv as ref

__all__ = ["causal_conv1d", "wavenet_block", "causal_conv1d_step", "wavenet_block_step",
           "wavenet_stack_step", "conv_state_size"]

_ACT_CODE = {None: 0, "none": 0, "relu": 1, "silu": 2, "tanh": 3}
_SILU = 2
_FROM_Y = (1, 3)  # relu, tanh: their derivatives are read from the output
# (K − 1)·dilation, the columns a causal conv looks back: larger overflows index arithmetic
MAX_LOOKBACK = 2**31 - 1


def conv_state_size(kernel_size: int, dilation: int) -> int:
    """Columns of history a causal conv layer carries: (K − 1) · d."""
    return (kernel_size - 1) * dilation


# ---------------------------------------------------------------- custom ops (C++ CPU) -----

@torch.library.custom_op("seqkern::causal_conv1d", mutates_args=(), device_types="cpu")
def _conv_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_state: Optional[Tensor],
             dilation: int, groups: int, activation: int, save_preact: bool
             ) -> tuple[Tensor, Tensor]:
    """Returns (y, pre-activation); the second is empty unless save_preact and silu (the only
    activation whose derivative cannot be computed from y)."""
    y, pre = _ext._C.conv_forward(x, weight, bias, initial_state, dilation, groups, activation,
                                  save_preact)
    return y, pre


@_conv_op.register_fake
def _(x, weight, bias, initial_state, dilation, groups, activation, save_preact):
    B, _, L = x.shape
    ct = registry.compute_dtype(x.dtype)
    keep = save_preact and activation == _SILU
    return (x.new_empty((B, weight.shape[0], L)),
            x.new_empty((B, weight.shape[0], L) if keep else (0,), dtype=ct))


@torch.library.custom_op("seqkern::causal_conv1d_backward", mutates_args=(), device_types="cpu")
def _conv_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor, initial_state: Optional[Tensor],
                      y: Tensor, preact: Tensor, dilation: int, groups: int, activation: int,
                      has_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dweight, dbias, dinitial_state); the last two are empty when absent."""
    return tuple(_ext._C.conv_backward(grad_y, x, weight, initial_state, y, preact, dilation,
                                       groups, activation, has_bias))


@_conv_backward_op.register_fake
def _(grad_y, x, weight, initial_state, y, preact, dilation, groups, activation, has_bias):
    return (x.new_empty(x.shape), weight.new_empty(weight.shape),
            x.new_empty((weight.shape[0],) if has_bias else (0,)),
            x.new_empty(initial_state.shape if initial_state is not None else (0,)))


def _conv_setup(ctx, inputs, output):
    x, weight, bias, initial_state, dilation, groups, activation, save_preact = inputs
    y, pre = output
    ctx.meta = (dilation, groups, activation, bias is not None, initial_state is not None)
    # y only where the derivative is read from it (relu, tanh; silu's comes from pre): a
    # caller may then change y in place before the backward, as with F.conv1d's output
    ctx.save_for_backward(x, weight, initial_state, y if activation in _FROM_Y else None, pre)


def _conv_backward(ctx, grad_y, _grad_pre):
    if torch.is_grad_enabled():
        raise RuntimeError("seqkern.causal_conv1d: double backward is not supported")
    dilation, groups, activation, has_bias, has_init = ctx.meta
    x, weight, initial_state, y, pre = ctx.saved_tensors
    if y is None:  # (not read by the kernel for this activation)
        y = grad_y.new_empty(0)
    if activation == _SILU and pre.numel() != grad_y.numel():
        raise RuntimeError("seqkern.causal_conv1d: the forward ran without saving the silu "
                           "pre-activation (save_preact=False), so it cannot be differentiated")
    dx, dw, db, dinit = _conv_backward_op(grad_y, x, weight, initial_state, y, pre,
                                          dilation, groups, activation, has_bias)
    return (dx, dw, db if has_bias else None, dinit if has_init else None,
            None, None, None, None)


_conv_op.register_autograd(_conv_backward, setup_context=_conv_setup)


@torch.library.custom_op("seqkern::wavenet_block", mutates_args=(), device_types="cpu")
def _wavenet_op(x: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor], skip_weight: Tensor,
                skip_bias: Optional[Tensor], res_weight: Tensor, res_bias: Optional[Tensor],
                initial_state: Optional[Tensor], dilation: int, save: bool
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (res, skip, h); h is the raw 2G-channel conv output (before bias), saved for
    backward only when save, else empty."""
    return tuple(_ext._C.wavenet_forward(x, conv_weight, conv_bias, skip_weight, skip_bias,
                                         res_weight, res_bias, initial_state, dilation, save))


@_wavenet_op.register_fake
def _(x, conv_weight, conv_bias, skip_weight, skip_bias, res_weight, res_bias, initial_state,
      dilation, save):
    B, R, L = x.shape
    return (x.new_empty((B, R, L)), x.new_empty((B, skip_weight.shape[0], L)),
            x.new_empty((B, conv_weight.shape[0], L) if save else (0,),
                        dtype=registry.compute_dtype(x.dtype)))


@torch.library.custom_op("seqkern::wavenet_block_backward", mutates_args=(), device_types="cpu")
def _wavenet_backward_op(grad_res: Tensor, grad_skip: Tensor, x: Tensor, conv_weight: Tensor,
                         conv_bias: Optional[Tensor], skip_weight: Tensor, res_weight: Tensor,
                         initial_state: Optional[Tensor], h: Tensor, dilation: int,
                         has_skip_bias: bool, has_res_bias: bool
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dconv_w, dconv_b, dskip_w, dskip_b, dres_w, dres_b, dinitial_state)."""
    return tuple(_ext._C.wavenet_backward(grad_res, grad_skip, x, conv_weight, conv_bias,
                                          skip_weight, res_weight, initial_state, h, dilation,
                                          has_skip_bias, has_res_bias))


@_wavenet_backward_op.register_fake
def _(grad_res, grad_skip, x, conv_weight, conv_bias, skip_weight, res_weight, initial_state, h,
      dilation, has_skip_bias, has_res_bias):
    def vec(present, n):
        return x.new_empty((n,) if present else (0,))

    return (x.new_empty(x.shape), x.new_empty(conv_weight.shape),
            vec(conv_bias is not None, conv_weight.shape[0]), x.new_empty(skip_weight.shape),
            vec(has_skip_bias, skip_weight.shape[0]), x.new_empty(res_weight.shape),
            vec(has_res_bias, res_weight.shape[0]),
            x.new_empty(initial_state.shape if initial_state is not None else (0,)))


def _wavenet_setup(ctx, inputs, output):
    (x, conv_weight, conv_bias, skip_weight, skip_bias, res_weight, res_bias, initial_state,
     dilation, save) = inputs
    ctx.meta = (dilation, save, skip_bias is not None, res_bias is not None)
    ctx.save_for_backward(x, conv_weight, conv_bias, skip_weight, res_weight, initial_state,
                          output[2])


def _wavenet_backward(ctx, grad_res, grad_skip, _grad_h):
    if torch.is_grad_enabled():
        raise RuntimeError("seqkern.wavenet_block: double backward is not supported")
    dilation, save, has_sb, has_rb = ctx.meta
    if not save:
        raise RuntimeError("seqkern.wavenet_block: the forward ran without saving activations "
                           "(save=False), so it cannot be differentiated")
    x, conv_weight, conv_bias, skip_weight, res_weight, initial_state, h = ctx.saved_tensors
    dx, dcw, dcb, dsw, dsb, drw, drb, dinit = _wavenet_backward_op(
        grad_res, grad_skip, x, conv_weight, conv_bias, skip_weight,
        res_weight, initial_state, h, dilation, has_sb, has_rb)
    return (dx, dcw, dcb if conv_bias is not None else None, dsw, dsb if has_sb else None, drw,
            drb if has_rb else None, dinit if initial_state is not None else None, None, None)


_wavenet_op.register_autograd(_wavenet_backward, setup_context=_wavenet_setup)


@torch.library.custom_op("seqkern::wavenet_stack_step", mutates_args=(), device_types="cpu")
def _wavenet_stack_step_op(x_t: Tensor, states: list[Tensor], conv_weights: list[Tensor],
                           conv_biases: list[Optional[Tensor]], skip_weights: list[Tensor],
                           skip_biases: list[Optional[Tensor]], res_weights: list[Tensor],
                           res_biases: list[Optional[Tensor]], dilations: list[int]
                           ) -> list[Tensor]:
    """One generation step through a stack of blocks (inference only; no autograd).
    Returns [Σ skip (B, S), x after the last block (B, R), new state of each layer...]."""
    return _ext._C.wavenet_stack_step(x_t, states, conv_weights, conv_biases, skip_weights,
                                      skip_biases, res_weights, res_biases, dilations)


@_wavenet_stack_step_op.register_fake
def _(x_t, states, conv_weights, conv_biases, skip_weights, skip_biases, res_weights,
      res_biases, dilations):
    B, R = x_t.shape
    return ([x_t.new_empty((B, skip_weights[0].shape[0])), x_t.new_empty((B, R))]
            + [s.new_empty(s.shape) for s in states])

if _ext._C is not None:
    registry.register("conv", "cpu")

# triton backend: registered (and the CUDA kernels of the four ops above) only if installed.
_triton_backend.install("conv", _conv_op, _conv_backward_op, _wavenet_op, _wavenet_backward_op)


# ---------------------------------------------------------------- argument checks ----------

def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def _check_same(x: Tensor, **tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; they must match")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; they must "
                            "match")


def _check_input_and_ints(x, name: str, dims: int, layout: str, dilation, groups) -> None:
    """x a floating-point `dims`-D tensor (`layout` for the message); dilation and groups
    integers >= 1."""
    if not isinstance(x, Tensor) or x.dim() != dims:
        raise ValueError(f"{name} must be a {layout} tensor, got shape "
                         f"{_shape(x) if isinstance(x, Tensor) else type(x).__name__}")
    for what, n in (("dilation", dilation), ("groups", groups)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{what} must be an integer >= 1, got {n!r}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _lookback(K: int, dilation: int) -> int:
    P = (K - 1) * dilation
    if P > MAX_LOOKBACK:
        raise ValueError(f"(kernel_size - 1) * dilation = ({K} - 1) * {dilation} = {P} exceeds "
                         f"the largest look-back supported, {MAX_LOOKBACK}")
    return P


def _check_conv(x: Tensor, weight: Tensor, bias: Tensor | None, dilation: int, groups: int,
                activation, initial_state: Tensor | None) -> None:
    _check_input_and_ints(x, "x", 3, "(B, C, L)", dilation, groups)
    if weight.dim() != 3:
        raise ValueError(f"weight must be (C_out, C_in/groups, K) as in nn.Conv1d, got shape "
                         f"{_shape(weight)}")
    C_out, C_in_g, K = weight.shape
    C_in = x.shape[1]
    if K < 1:
        raise ValueError(f"kernel size (weight.shape[2]) must be >= 1, got {K}")
    if C_in % groups:
        raise ValueError(f"in_channels ({C_in}, x.shape[1]) is not divisible by groups ({groups})")
    if C_out % groups:
        raise ValueError(f"out_channels ({C_out}, weight.shape[0]) is not divisible by groups "
                         f"({groups})")
    if C_in_g != C_in // groups:
        raise ValueError(f"weight.shape[1] must be in_channels / groups = {C_in} / {groups} = "
                         f"{C_in // groups}, got {C_in_g} (weight shape {_shape(weight)})")
    if bias is not None and _shape(bias) != (C_out,):
        raise ValueError(f"bias must have shape ({C_out},), got {_shape(bias)}")
    if activation not in _ACT_CODE:
        raise ValueError(f"activation must be None, 'none', 'relu', 'silu' or 'tanh', got "
                         f"{activation!r}")
    P = _lookback(K, dilation)
    if initial_state is not None and _shape(initial_state) != (x.shape[0], C_in, P):
        raise ValueError(f"initial_state must be (B, C_in, (K-1)*dilation) = "
                         f"({x.shape[0]}, {C_in}, {P}), got {_shape(initial_state)}")
    _check_same(x, weight=weight, bias=bias, initial_state=initial_state)


# ---------------------------------------------------------------- public API ---------------

@autocast_op
def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, dilation: int = 1,
                  groups: int = 1, activation: str | None = None,
                  initial_state: Tensor | None = None, return_final_state: bool = False):
    """Causal dilated 1-D convolution, y = act(conv(x_ext) + bias) (SPEC.md).

    x (B, C_in, L); weight (C_out, C_in/groups, K) as in nn.Conv1d; activation None, "relu",
    "silu" or "tanh"; initial_state (B, C_in, (K−1)·d) are the last input columns of the
    previous chunk (zeros when None). Returns y (B, C_out, L), and the final state when
    return_final_state.
    """
    _check_conv(x, weight, bias, dilation, groups, activation, initial_state)
    backend = registry.select("conv", x.device, x.dtype)
    if backend == "triton":
        from seqkern.triton import conv as triton_conv

        y = triton_conv.causal_conv1d(x, weight, bias, dilation, groups, activation,
                                      initial_state)
        if return_final_state:
            return y, ref.final_state(x, initial_state, (weight.shape[2] - 1) * dilation)
        return y
    if backend != "cpu":
        return ref.causal_conv1d(x, weight, bias, dilation, groups, activation, initial_state,
                                 return_final_state)
    code = _ACT_CODE[activation]
    grad = _ext.needs_grad(x, weight, bias, initial_state)
    if not grad and _ext.direct_call_ok(x, weight, bias, initial_state):
        # eager inference: nothing to record, so no custom-op dispatch (~30 µs, as much as the
        # kernel at a few columns)
        y, _ = _ext._C.conv_forward(x, weight, bias, initial_state, dilation, groups, code, False)
    else:
        y, _ = _conv_op(x, weight, bias, initial_state, dilation, groups, code,
                        grad and code == _SILU)
    if return_final_state:
        return y, ref.final_state(x, initial_state, (weight.shape[2] - 1) * dilation)
    return y


def _check_wavenet(x, conv_weight, conv_bias, skip_weight, skip_bias, res_weight, res_bias,
                   dilation, initial_state):
    _check_conv(x, conv_weight, conv_bias, dilation, 1, None, initial_state)
    _check_wavenet_weights(x, conv_weight, skip_weight, skip_bias, res_weight, res_bias)


def _check_wavenet_weights(x, conv_weight, skip_weight, skip_bias, res_weight, res_bias):
    """The gate, skip and residual weights against x (B, R, ...) and the conv weight."""
    R = x.shape[1]
    if conv_weight.shape[0] % 2:
        raise ValueError(f"conv_weight must have 2*gate_channels output channels (an even "
                         f"number), got {conv_weight.shape[0]}")
    G = conv_weight.shape[0] // 2
    for name, w, b, rows in (("skip", skip_weight, skip_bias, None),
                             ("res", res_weight, res_bias, R)):
        if w.dim() not in (2, 3) or (w.dim() == 3 and w.shape[2] != 1) or w.shape[1] != G:
            raise ValueError(f"{name}_weight must be (out, gate_channels={G}) or "
                             f"(out, {G}, 1), got {_shape(w)}")
        if rows is not None and w.shape[0] != rows:
            raise ValueError(f"res_weight must have residual_channels = {rows} rows (x.shape[1]),"
                             f" got {w.shape[0]}")
        if b is not None and _shape(b) != (w.shape[0],):
            raise ValueError(f"{name}_bias must have shape ({w.shape[0]},), got {_shape(b)}")
        _check_same(x, **{f"{name}_weight": w, f"{name}_bias": b})


@autocast_op
def wavenet_block(x: Tensor, conv_weight: Tensor, conv_bias: Tensor | None, skip_weight: Tensor,
                  skip_bias: Tensor | None, res_weight: Tensor, res_bias: Tensor | None,
                  dilation: int = 1, initial_state: Tensor | None = None,
                  return_final_state: bool = False):
    """WaveNet gated residual block (SPEC.md); returns (res, skip) or (res, skip, final state).

    x (B, R, L); conv_weight (2G, R, K); skip_weight (S, G[, 1]); res_weight (R, G[, 1]).
    """
    _check_wavenet(x, conv_weight, conv_bias, skip_weight, skip_bias, res_weight, res_bias,
                   dilation, initial_state)
    backend = registry.select("conv", x.device, x.dtype)
    if backend == "triton":
        from seqkern.triton import conv as triton_conv

        res, skip = triton_conv.wavenet_block(x, conv_weight, conv_bias, skip_weight, skip_bias,
                                              res_weight, res_bias, dilation, initial_state)
        if return_final_state:
            return res, skip, ref.final_state(x, initial_state,
                                              (conv_weight.shape[2] - 1) * dilation)
        return res, skip
    if backend != "cpu":
        return ref.wavenet_block(x, conv_weight, conv_bias, skip_weight, skip_bias, res_weight,
                                 res_bias, dilation, initial_state, return_final_state)
    sw = skip_weight.reshape(skip_weight.shape[0], skip_weight.shape[1])
    rw = res_weight.reshape(res_weight.shape[0], res_weight.shape[1])
    save = _ext.needs_grad(x, conv_weight, conv_bias, skip_weight, skip_bias, res_weight,
                           res_bias, initial_state)
    if not save and _ext.direct_call_ok(x, conv_weight, conv_bias, skip_weight, skip_bias,
                                        res_weight, res_bias, initial_state):
        res, skip, _ = _ext._C.wavenet_forward(x, conv_weight, conv_bias, sw, skip_bias, rw,
                                               res_bias, initial_state, dilation, False)
    else:
        res, skip, _ = _wavenet_op(x, conv_weight, conv_bias, sw, skip_bias, rw, res_bias,
                                   initial_state, dilation, save)
    if return_final_state:
        return res, skip, ref.final_state(x, initial_state, (conv_weight.shape[2] - 1) * dilation)
    return res, skip


# ---------------------------------------------------------------- streaming ----------------
# One step costs O(C_in·K·C_out) for the matmul plus an O(C_in·P) shift of the queue; there is
# no kernel of its own because at one column per call the time goes to dispatch, not math.

def _taps(x_t: Tensor, state: Tensor, dilation: int) -> tuple[Tensor, Tensor]:
    """The K input columns tap k reads at this step, (B, C, K), and the new state."""
    x_ext = torch.cat([state, x_t.unsqueeze(2)], dim=2)     # (B, C, P + 1)
    return x_ext[:, :, ::dilation], x_ext[:, :, 1:]


def _check_step(x_t, state, weight, bias, dilation, groups):
    _check_input_and_ints(x_t, "x_t", 2, "(B, C_in)", dilation, groups)
    if x_t.shape[1] % groups:
        raise ValueError(f"x_t has C_in = {x_t.shape[1]} channels, not divisible by "
                         f"groups = {groups}")
    if (weight.dim() != 3 or weight.shape[1] * groups != x_t.shape[1] or weight.shape[2] < 1
            or weight.shape[0] % groups):
        raise ValueError(f"weight must be (C_out, C_in/groups = {x_t.shape[1] // groups}, K) "
                         f"with C_out divisible by groups = {groups}, got {_shape(weight)}")
    if bias is not None and _shape(bias) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {_shape(bias)}")
    P = _lookback(weight.shape[2], dilation)
    if _shape(state) != (x_t.shape[0], x_t.shape[1], P):
        raise ValueError(f"state must be (B, C_in, (K-1)*dilation) = "
                         f"({x_t.shape[0]}, {x_t.shape[1]}, {P}), got {_shape(state)}")
    _check_same(x_t, state=state, weight=weight, bias=bias)


@autocast_op
def causal_conv1d_step(x_t: Tensor, state: Tensor, weight: Tensor, bias: Tensor | None = None,
                       dilation: int = 1, groups: int = 1, activation: str | None = None):
    """One step of the streaming form: x_t (B, C_in), state (B, C_in, (K−1)·d).

    Returns (y_t (B, C_out), new state); equals column t of causal_conv1d with the state as
    initial_state.
    """
    _check_step(x_t, state, weight, bias, dilation, groups)
    if (registry.select("conv", x_t.device, x_t.dtype) == "triton"
            and not _ext.needs_grad(x_t, state, weight, bias)):
        from seqkern.triton import conv as triton_conv

        return triton_conv.causal_conv1d_step(x_t, state, weight, bias, dilation, groups,
                                              activation)
    taps, new_state = _taps(x_t, state, dilation)
    B, C_in, K = taps.shape
    C_out = weight.shape[0]
    if groups == 1:
        y = taps.reshape(B, C_in * K) @ weight.reshape(C_out, C_in * K).t()
    else:
        tg = taps.reshape(B, groups, (C_in // groups) * K)
        wg = weight.reshape(groups, C_out // groups, (C_in // groups) * K)
        y = torch.einsum("bgi,goi->bgo", tg, wg).reshape(B, C_out)
    if bias is not None:
        y = y + bias
    return ref.activate(y, activation), new_state


@autocast_op
def wavenet_block_step(x_t: Tensor, state: Tensor, conv_weight: Tensor, conv_bias: Tensor | None,
                       skip_weight: Tensor, skip_bias: Tensor | None, res_weight: Tensor,
                       res_bias: Tensor | None, dilation: int = 1):
    """One step of the WaveNet block; returns (res_t (B, R), skip_t (B, S), new state)."""
    _check_step(x_t, state, conv_weight, conv_bias, dilation, 1)
    _check_wavenet_weights(x_t, conv_weight, skip_weight, skip_bias, res_weight, res_bias)
    taps, new_state = _taps(x_t, state, dilation)
    B, R, K = taps.shape
    G = conv_weight.shape[0] // 2
    flat = taps.reshape(B, R * K)
    w = conv_weight.reshape(2 * G, R * K)
    h = flat @ w.t() if conv_bias is None else torch.addmm(conv_bias, flat, w.t())
    z = torch.tanh(h[:, :G]) * torch.sigmoid(h[:, G:])
    sw = skip_weight.reshape(skip_weight.shape[0], G)
    rw = res_weight.reshape(res_weight.shape[0], G)
    skip = z @ sw.t() if skip_bias is None else torch.addmm(skip_bias, z, sw.t())
    res = torch.addmm(x_t, z, rw.t()) if res_bias is None else torch.addmm(x_t + res_bias, z, rw.t())
    return res, skip, new_state


@autocast_op
def wavenet_stack_step(x_t: Tensor, states: list[Tensor], blocks: list[tuple],
                       dilations: list[int]):
    """One step through a stack of WaveNet blocks: block i gets params blocks[i] = (conv_weight,
    conv_bias, skip_weight, skip_bias, res_weight, res_bias) and queue states[i].

    Returns (Σ skip_t (B, S), x_t after the last block (B, R), new states). On the C++ backend,
    when nothing needs a gradient, the whole stack runs in one call; otherwise block by block.
    """
    if len(states) != len(blocks) or len(dilations) != len(blocks):
        raise ValueError(f"need one state and one dilation per block: {len(blocks)} blocks, "
                         f"{len(states)} states, {len(dilations)} dilations")
    for i, d in enumerate(dilations):
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            raise ValueError(f"dilations[{i}] must be an integer >= 1, got {d!r}")
    fused = (registry.select("conv", x_t.device, x_t.dtype) == "cpu"
             and not _ext.needs_grad(x_t, *states, *(t for p in blocks for t in p)))
    if not fused:
        skip_sum, new_states = None, []
        for st, p, d in zip(states, blocks, dilations):
            x_t, skip, st = wavenet_block_step(x_t, st, *p, d)
            new_states.append(st)
            skip_sum = skip if skip_sum is None else skip_sum + skip
        return skip_sum, x_t, new_states
    if x_t.dim() != 2:
        raise ValueError(f"x_t must be (B, R), got shape {_shape(x_t)}")
    if not x_t.is_floating_point():
        raise TypeError(f"x_t must be a floating-point tensor, got {x_t.dtype}")
    _check_same(x_t, **{f"states[{i}]": st for i, st in enumerate(states)})
    # (the per-layer shapes, dtypes and devices are checked in C++: at one sample per call,
    # Python checks of every layer's six parameters would cost more than the layer's math)
    if any(len(p) != 6 for p in blocks):
        raise ValueError("each of blocks must be (conv_weight, conv_bias, skip_weight, "
                         "skip_bias, res_weight, res_bias)")
    cols = [list(c) for c in zip(*blocks)]
    # Generation is latency-bound (one sample per call, ~20 µs of math per layer): eager calls
    # go straight to the extension; the registered op is what torch.compile/export see.
    step = (_ext._C.wavenet_stack_step if _ext.direct_call_ok(x_t, *states)
            else _wavenet_stack_step_op)
    out = step(x_t, list(states), *cols, list(dilations))
    return out[0], out[1], list(out[2:])
