"""Causal dilated convolution, the WaveNet gated residual block and their streaming forms, in
plain PyTorch (SPEC.md, "Causal dilated convolution" and "Streaming").

Everything here is written as the formula reads: one shifted matmul per tap over an explicit
history ``x_ext = [initial_state | x]``. It is differentiable by autograd, runs on any device,
and is the definition every compiled kernel is tested against.
"""
from __future__ import annotations

import torch
from torch import Tensor

from seqkern import _ext

__all__ = [
    "ACTIVATIONS", "activate", "history", "final_state", "causal_conv1d",
    "depthwise_causal_conv1d", "wavenet_block", "causal_conv1d_step", "wavenet_block_step",
]

ACTIVATIONS = (None, "none", "relu", "silu", "tanh")


def activate(y: Tensor, activation: str | None) -> Tensor:
    if activation is None or activation == "none":
        return y
    if activation == "relu":
        return torch.relu(y)
    if activation == "silu":
        return torch.nn.functional.silu(y)
    if activation == "tanh":
        return torch.tanh(y)
    raise ValueError(f"activation must be one of none, relu, silu, tanh; got {activation!r}")


def history(x: Tensor, initial_state: Tensor | None, P: int) -> Tensor:
    """x_ext = [initial_state | x] (zeros when there is no state): (B, C, P + L)."""
    if initial_state is None:
        initial_state = x.new_zeros(x.shape[0], x.shape[1], P)
    return torch.cat([initial_state.to(x.dtype), x], dim=2)


def final_state(x: Tensor, initial_state: Tensor | None, P: int) -> Tensor:
    """The last P columns of x_ext: the state the next chunk starts from. Not a view of x: a
    caller may refill x with the next chunk. Traced (torch.compile, export, fake tensors) it
    takes no branch on L ≥ P, which would guard a symbolic length."""
    L = x.shape[2]
    if torch.compiler.is_compiling() or _ext.is_fake(x):
        # (the whole of x_ext, as slicing x's last min(L, P) columns guards on L; then a
        # compact copy of P columns, not a view keeping the chunk's copy alive)
        ext = history(x, initial_state, P)
        return ext[:, :, ext.shape[2] - P:].clone(memory_format=torch.contiguous_format)
    if L >= P:
        return x[:, :, L - P:].clone()
    return history(x, initial_state, P)[:, :, L:]


def _finish(y, bias, activation, x_ext, P, return_final_state):
    """Bias, activation, and (optionally) the final state: the last P columns of x_ext."""
    if bias is not None:
        y = y + bias[None, :, None]
    y = activate(y, activation)
    if return_final_state:
        return y, x_ext[:, :, x_ext.shape[2] - P:]
    return y


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, dilation: int = 1,
                  groups: int = 1, activation: str | None = None,
                  initial_state: Tensor | None = None, return_final_state: bool = False):
    """y[b, o, t] = act(bias[o] + Σ_k Σ_{c ∈ group(o)} W[o, c, k] · x_ext[b, c, P + t − (K−1−k)·d]).

    x is (B, C_in, L), weight nn.Conv1d's (C_out, C_in/groups, K), P = (K−1)·d.
    """
    B, C_in, L = x.shape
    C_out, C_in_g, K = weight.shape
    P = (K - 1) * dilation
    x_ext = history(x, initial_state, P)
    xg = x_ext.reshape(B, groups, C_in_g, P + L)              # channel c of group g
    wg = weight.reshape(groups, C_out // groups, C_in_g, K)
    y = x.new_zeros(B, groups, C_out // groups, L)
    for k in range(K):
        shift = (K - 1 - k) * dilation
        window = xg[..., P - shift:P - shift + L]               # x_ext[t − shift], t in [0, L)
        y = y + torch.einsum("goc,bgcl->bgol", wg[..., k], window)
    y = y.reshape(B, C_out, L)
    return _finish(y, bias, activation, x_ext, P, return_final_state)


def depthwise_causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                            dilation: int = 1, activation: str | None = None,
                            initial_state: Tensor | None = None,
                            return_final_state: bool = False):
    """groups = C: y[b, c, t] = act(bias[c] + Σ_k w[c, 0, k] · x_ext[b, c, P + t − (K−1−k)·d])."""
    L = x.shape[2]
    K = weight.shape[2]
    P = (K - 1) * dilation
    x_ext = history(x, initial_state, P)
    y = torch.zeros_like(x)
    for k in range(K):
        shift = (K - 1 - k) * dilation
        y = y + weight[None, :, 0, k, None] * x_ext[:, :, P - shift:P - shift + L]
    return _finish(y, bias, activation, x_ext, P, return_final_state)


def _pointwise(z: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """1×1 convolution; weight (out, in) or nn.Conv1d's (out, in, 1)."""
    w = weight.reshape(weight.shape[0], weight.shape[1])
    out = torch.einsum("oc,bcl->bol", w, z)
    return out if bias is None else out + bias[None, :, None]


def wavenet_block(x: Tensor, conv_weight: Tensor, conv_bias: Tensor | None, skip_weight: Tensor,
                  skip_bias: Tensor | None, res_weight: Tensor, res_bias: Tensor | None,
                  dilation: int = 1, initial_state: Tensor | None = None,
                  return_final_state: bool = False):
    """WaveNet gated residual block (van den Oord et al. 2016); returns (res, skip[, state]).

    a, b = split(causal_conv(x; 2G channels));  z = tanh(a) ⊙ σ(b);
    skip = W_skip z + b_skip;  res = x + W_res z + b_res.
    """
    h, state = causal_conv1d(x, conv_weight, conv_bias, dilation, 1, None, initial_state, True)
    G = conv_weight.shape[0] // 2
    z = torch.tanh(h[:, :G]) * torch.sigmoid(h[:, G:])
    skip = _pointwise(z, skip_weight, skip_bias)
    res = x + _pointwise(z, res_weight, res_bias)
    return (res, skip, state) if return_final_state else (res, skip)


def causal_conv1d_step(x_t: Tensor, state: Tensor, weight: Tensor, bias: Tensor | None = None,
                       dilation: int = 1, groups: int = 1, activation: str | None = None):
    """One time step of the streaming form: x_t (B, C_in), state (B, C_in, P) holds the last
    P = (K−1)·d inputs, oldest first. Returns (y_t (B, C_out), new state)."""
    x_ext = torch.cat([state.to(x_t.dtype), x_t[:, :, None]], dim=2)   # (B, C_in, P + 1)
    y = causal_conv1d(x_t[:, :, None], weight, bias, dilation, groups, activation,
                      initial_state=state)
    return y[:, :, 0], x_ext[:, :, 1:]


def wavenet_block_step(x_t: Tensor, state: Tensor, conv_weight: Tensor, conv_bias: Tensor | None,
                       skip_weight: Tensor, skip_bias: Tensor | None, res_weight: Tensor,
                       res_bias: Tensor | None, dilation: int = 1):
    """One time step of the WaveNet block; returns (res_t (B, R), skip_t (B, S), new state)."""
    res, skip, new_state = wavenet_block(x_t[:, :, None], conv_weight, conv_bias, skip_weight,
                                         skip_bias, res_weight, res_bias, dilation, state, True)
    return res[:, :, 0], skip[:, :, 0], new_state
