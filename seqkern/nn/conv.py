"""Causal dilated convolution modules: ``CausalConv1d``, ``WaveNetBlock``, ``WaveNet`` and
``TCN`` (Bai, Kolter & Koltun 2018).

Parameters are laid out as ``torch.nn.Conv1d``'s, so ``CausalConv1d`` loads an ``nn.Conv1d``
state_dict unchanged. Every module streams: ``forward(x, state, return_state=True)`` processes a
chunk and returns the state to continue from, and ``step(x_t, state)`` advances one time step.
A conv layer's state is its queue of the last (K−1)·d inputs (the fast-generation scheme of
WaveNet), so a generated sample costs O(layers), not O(receptive field). ``state=None`` means
the sequence starts here (zero history).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from seqkern.nn._weights import refresh_weights
from seqkern.ops import conv as ops

__all__ = ["CausalConv1d", "WaveNetBlock", "WaveNet", "TCN", "TemporalBlock"]


class CausalConv1d(nn.Module):
    """y = act(causal dilated conv1d(x) + bias); x (B, C_in, L) → (B, C_out, L), or unbatched
    (C_in, L) → (C_out, L)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1,
                 groups: int = 1, bias: bool = True, activation: str | None = None, device=None,
                 dtype=None):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("kernel_size", kernel_size), ("dilation", dilation), ("groups", groups)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) "
                             f"must be divisible by groups ({groups})")
        if activation not in (None, "none", "relu", "silu", "tanh"):
            raise ValueError(f"activation must be None, 'relu', 'silu' or 'tanh', got {activation!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.dilation, self.groups = kernel_size, dilation, groups
        self.activation = activation
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, **kw))
        self.bias = nn.Parameter(torch.empty(out_channels, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv1d's initialisation, so a freshly built module is distributed the same way
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def state_size(self) -> int:
        return ops.conv_state_size(self.kernel_size, self.dilation)

    @property
    def receptive_field(self) -> int:
        return 1 + self.state_size

    def initial_state(self, batch_size: int) -> Tensor:
        return self.weight.new_zeros(batch_size, self.in_channels, self.state_size)

    def forward(self, x: Tensor, state: Tensor | None = None, return_state: bool = False):
        """x (B, C_in, L), or (C_in, L) unbatched as nn.Conv1d takes it (then `state` and the
        returned state are (C_in, S) too)."""
        unbatched = isinstance(x, Tensor) and x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0)
            if isinstance(state, Tensor):
                if state.dim() != 2:
                    raise ValueError(f"state must be ({self.in_channels}, "
                                     f"{(self.kernel_size - 1) * self.dilation}) for unbatched "
                                     f"input, got {tuple(state.shape)}")
                state = state.unsqueeze(0)
        out = ops.causal_conv1d(x, self.weight, self.bias, self.dilation, self.groups,
                                self.activation, state, return_state)
        if unbatched:
            return (out[0].squeeze(0), out[1].squeeze(0)) if return_state else out.squeeze(0)
        return out

    def step(self, x_t: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x_t (B, C_in) → (y_t (B, C_out), new state)."""
        if state is None:
            state = self.initial_state(x_t.shape[0])
        refresh_weights(self)  # step() is not a __call__: weight_norm's hook must run here
        return ops.causal_conv1d_step(x_t, state, self.weight, self.bias, self.dilation,
                                      self.groups, self.activation)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"dilation={self.dilation}")
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.activation not in (None, "none"):
            s += f", activation={self.activation!r}"
        return s


class WaveNetBlock(nn.Module):
    """Gated residual block: x (B, R, L) → (res (B, R, L), skip (B, S, L)).

    Parameters: ``conv`` (2G, R, K) dilated, ``skip`` (S, G, 1) and ``res`` (R, G, 1) 1×1 convs.
    """

    def __init__(self, residual_channels: int, gate_channels: int, skip_channels: int,
                 kernel_size: int = 2, dilation: int = 1, bias: bool = True, device=None,
                 dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.residual_channels, self.gate_channels = residual_channels, gate_channels
        self.skip_channels, self.dilation = skip_channels, dilation
        self.conv = CausalConv1d(residual_channels, 2 * gate_channels, kernel_size, dilation,
                                 bias=bias, **kw)
        self.skip = nn.Conv1d(gate_channels, skip_channels, 1, bias=bias, **kw)
        self.res = nn.Conv1d(gate_channels, residual_channels, 1, bias=bias, **kw)

    @property
    def state_size(self) -> int:
        return self.conv.state_size

    def initial_state(self, batch_size: int) -> Tensor:
        return self.conv.initial_state(batch_size)

    def _params(self):
        # the three convs run as one op, not through their __call__: run their weight hooks
        for m in (self.conv, self.skip, self.res):
            refresh_weights(m)
        return (self.conv.weight, self.conv.bias, self.skip.weight, self.skip.bias,
                self.res.weight, self.res.bias)

    def _step_params(self):
        # generation calls this for every block at every sample; reading the parameter dicts
        # directly skips nn.Module.__getattr__ (a third of the step's Python time)
        try:
            c, s, r = self.conv._parameters, self.skip._parameters, self.res._parameters
            return (c["weight"], c["bias"], s["weight"], s["bias"], r["weight"], r["bias"])
        except KeyError:   # a parametrization or weight_norm/pruning replaced a parameter
            return self._params()

    def forward(self, x: Tensor, state: Tensor | None = None, return_state: bool = False, *,
                _res_unused: bool = False):
        # _res_unused (WaveNet's last block, whose res output it drops): the res conv's
        # parameters go in detached, so that they get no gradient (None, as in a plain torch
        # stack), not a zero one from the fused op that weight decay would then act on
        p = self._params()
        if _res_unused:
            p = p[:4] + tuple(t.detach() if t is not None else None for t in p[4:])
        return ops.wavenet_block(x, *p, self.dilation, state, return_state)

    def step(self, x_t: Tensor, state: Tensor | None = None):
        """x_t (B, R) → (res_t (B, R), skip_t (B, S), new state)."""
        if state is None:
            state = self.initial_state(x_t.shape[0])
        return ops.wavenet_block_step(x_t, state, *self._params(), self.dilation)


class WaveNet(nn.Module):
    """The WaveNet stack: ``layers`` gated residual blocks with dilations 1, 2, 4, …,
    2^(dilation_cycle−1), repeated. x (B, R, L) → Σ skip (B, S, L)."""

    def __init__(self, layers: int, residual_channels: int, gate_channels: int,
                 skip_channels: int, kernel_size: int = 2, dilation_cycle: int = 10,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        if layers < 1 or dilation_cycle < 1:
            raise ValueError(f"layers and dilation_cycle must be >= 1, got {layers}, {dilation_cycle}")
        self.dilations = [2 ** (i % dilation_cycle) for i in range(layers)]
        self.blocks = nn.ModuleList(
            WaveNetBlock(residual_channels, gate_channels, skip_channels, kernel_size, d, bias,
                         device=device, dtype=dtype) for d in self.dilations)
        self.skip_channels = skip_channels

    @property
    def receptive_field(self) -> int:
        return 1 + sum(b.state_size for b in self.blocks)

    def initial_state(self, batch_size: int) -> list[Tensor]:
        return [b.initial_state(batch_size) for b in self.blocks]

    def forward(self, x: Tensor, state: list[Tensor] | None = None, return_state: bool = False):
        skip_sum = None
        new_state = []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            out = block(x, None if state is None else state[i], return_state,
                        _res_unused=i == last)
            x, skip = out[0], out[1]
            if return_state:
                new_state.append(out[2])
            skip_sum = skip if skip_sum is None else skip_sum + skip
        return (skip_sum, new_state) if return_state else skip_sum

    def step(self, x_t: Tensor, state: list[Tensor] | None = None):
        """x_t (B, R) → (Σ skip_t (B, S), new per-layer queues)."""
        if state is None:
            state = self.initial_state(x_t.shape[0])
        skip_sum, _, new_state = ops.wavenet_stack_step(
            x_t, list(state), [b._step_params() for b in self.blocks], self.dilations)
        return skip_sum, new_state


class TemporalBlock(nn.Module):
    """TCN residual block: relu(conv2(drop(relu(conv1(x))))) → drop, added to x (through a 1×1
    conv when the width changes), then relu. Both convs are causal with the same dilation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int,
                 dropout: float = 0.0, bias: bool = True, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.conv1 = CausalConv1d(in_channels, out_channels, kernel_size, dilation, bias=bias,
                                  activation="relu", **kw)
        self.conv2 = CausalConv1d(out_channels, out_channels, kernel_size, dilation, bias=bias,
                                  activation="relu", **kw)
        self.downsample = (nn.Conv1d(in_channels, out_channels, 1, bias=bias, **kw)
                           if in_channels != out_channels else None)
        self.dropout = dropout

    def initial_state(self, batch_size: int) -> tuple[Tensor, Tensor]:
        return self.conv1.initial_state(batch_size), self.conv2.initial_state(batch_size)

    def _residual(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(x)

    def forward(self, x: Tensor, state=None, return_state: bool = False):
        s1, s2 = (None, None) if state is None else state
        h = self.conv1(x, s1, return_state)
        if return_state:
            h, s1 = h
        h = F.dropout(h, self.dropout, self.training)
        h = self.conv2(h, s2, return_state)
        if return_state:
            h, s2 = h
        h = F.dropout(h, self.dropout, self.training)
        out = torch.relu(h + self._residual(x))
        return (out, (s1, s2)) if return_state else out

    def step(self, x_t: Tensor, state=None):
        s1, s2 = self.initial_state(x_t.shape[0]) if state is None else state
        h, s1 = self.conv1.step(x_t, s1)
        h = F.dropout(h, self.dropout, self.training)
        h, s2 = self.conv2.step(h, s2)
        h = F.dropout(h, self.dropout, self.training)
        res = self._residual(x_t.unsqueeze(2)).squeeze(2)
        return torch.relu(h + res), (s1, s2)


class TCN(nn.Module):
    """Temporal convolutional network (Bai et al. 2018): block i has dilation 2^i and width
    channels[i]. x (B, in_channels, L) → (B, channels[-1], L).

    The paper wraps each conv in weight normalisation; apply
    ``torch.nn.utils.parametrizations.weight_norm`` to ``block.conv1``/``conv2`` to get it.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], kernel_size: int = 2,
                 dropout: float = 0.0, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if len(channels) == 0:
            raise ValueError("channels must list at least one block width")
        widths = [in_channels] + list(channels)
        self.blocks = nn.ModuleList(
            TemporalBlock(widths[i], widths[i + 1], kernel_size, 2 ** i, dropout, bias,
                          device=device, dtype=dtype) for i in range(len(channels)))

    @property
    def receptive_field(self) -> int:
        return 1 + sum(2 * b.conv1.state_size for b in self.blocks)

    def initial_state(self, batch_size: int) -> list:
        return [b.initial_state(batch_size) for b in self.blocks]

    def forward(self, x: Tensor, state: list | None = None, return_state: bool = False):
        new_state = []
        for i, block in enumerate(self.blocks):
            out = block(x, None if state is None else state[i], return_state)
            if return_state:
                x, s = out
                new_state.append(s)
            else:
                x = out
        return (x, new_state) if return_state else x

    def step(self, x_t: Tensor, state: list | None = None):
        """x_t (B, in_channels) → (y_t (B, channels[-1]), new state)."""
        if state is None:
            state = self.initial_state(x_t.shape[0])
        new_state = []
        for block, s in zip(self.blocks, state):
            x_t, s = block.step(x_t, s)
            new_state.append(s)
        return x_t, new_state
