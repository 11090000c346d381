"""Drop-in recurrent modules: ``RNN``, ``LSTM``, ``GRU`` and the cells.

Constructor signatures, parameter names/shapes, initialisation, return values, ``h0`` handling,
unbatched input and ``PackedSequence`` input/output match ``torch.nn`` so a state_dict moves
between the two unchanged. Extras: ``LSTM(peephole=True)`` (``weight_peep_l{k}`` of shape (3, H)),
``GRU(reset_after=False)`` (Cho et al. 2014), ``lengths=`` with padded input, and ``step()`` for
streaming. The modules do not subclass ``torch.nn.RNNBase`` on purpose: TorchDynamo graph-breaks
on every RNNBase, and these must compile with ``fullgraph=True``.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from seqkern import _ext, registry
from seqkern.nn._weights import refresh_weights
from seqkern.ops import _autocast
from seqkern.ops import rnn as ops
from seqkern.reference.rnn import gate_count

_STEP_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_CPU = torch.device("cpu")  # (x.device makes a new object each time: 0.4 µs against is_cpu's 0.06)


__all__ = ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"]


_TORCH_MODES = {"lstm": "LSTM", "gru": "GRU", "gru_cho": "GRU", "rnn_tanh": "RNN_TANH",
                "rnn_relu": "RNN_RELU"}


_TORCH_ONLY_STATE = ("_all_weights", "_flat_weights", "_flat_weight_refs", "_flat_weights_names")
_WEIGHT_KEY_OF = {"weight_ih": "w_ih", "weight_hh": "w_hh", "bias_ih": "b_ih", "bias_hh": "b_hh",
                  "weight_hr": "w_hr", "weight_peep": "w_peep"}


def _with_kind(state: dict, kind: str | None = None) -> dict:
    """A pickled module's state with seqkern's fields filled in, so that it loads and runs:
    - from seqkern before `kind` existed (its `mode` was then seqkern's lowercase name);
    - from torch.nn's module of the same name (an unpickler that maps torch.nn.LSTM to
      seqkern.nn.LSTM, to load a whole-model checkpoint): `kind` from torch's `mode` (layers)
      or the cell's `kind` argument, the weight names from torch's `_all_weights`."""
    if "kind" in state:
        return state
    state = dict(state)
    mode = state.get("mode")
    if mode in _TORCH_MODES:
        state["kind"] = mode
    elif mode in _TORCH_MODES.values():
        state["kind"] = mode.lower()  # ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
    elif kind is not None:
        state["kind"] = kind
    if "_all_weights" in state and "_names" not in state:
        state["_names"] = [{_WEIGHT_KEY_OF[n.rsplit("_l", 1)[0]]: n for n in names}
                           for names in state["_all_weights"]]
        state.setdefault("peephole", False)
        if state["kind"] == "gru":
            state.setdefault("reset_after", True)
    for key in _TORCH_ONLY_STATE:
        state.pop(key, None)
    return state


def _graph_being_recorded() -> bool:
    """torch.compile, or torch.jit.trace: a Python int read from a tensor would be baked in."""
    return torch.compiler.is_compiling() or torch._C._is_tracing()


def _reset_uniform(module: nn.Module) -> None:
    """torch's initialisation of recurrent layers and cells: every parameter U(−1/√H, 1/√H)."""
    std = 1.0 / math.sqrt(module.hidden_size) if module.hidden_size > 0 else 0
    for p in module.parameters():
        nn.init.uniform_(p, -std, std)


class _RecurrentBase(nn.Module):
    def __init__(self, mode, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, peephole=False, device=None,
                 dtype=None):
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if not isinstance(num_layers, int) or num_layers <= 0:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if not 0 <= dropout <= 1 or isinstance(dropout, bool):
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        if proj_size < 0 or (proj_size and proj_size >= hidden_size):
            raise ValueError(f"proj_size must be in [0, hidden_size={hidden_size}), got {proj_size}")
        # seqkern's name of the recurrence (the ops' `mode`); `mode` is torch.nn.RNNBase's
        self.kind = mode
        self.mode = _TORCH_MODES[mode]
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so "
                          f"non-zero dropout expects num_layers greater than 1, but got "
                          f"dropout={dropout} and num_layers={num_layers}", stacklevel=3)
        self.bidirectional, self.proj_size, self.peephole = bidirectional, proj_size, peephole
        D = 2 if bidirectional else 1
        G = gate_count(mode)
        real_h = proj_size if proj_size > 0 else hidden_size
        kw = {"device": device, "dtype": dtype}
        self._names: list[dict] = []
        for k in range(num_layers):
            for d in range(D):
                sfx = f"_l{k}" + ("_reverse" if d == 1 else "")
                in_size = input_size if k == 0 else real_h * D
                names = {"w_ih": "weight_ih" + sfx, "w_hh": "weight_hh" + sfx}
                setattr(self, names["w_ih"], nn.Parameter(torch.empty(G * hidden_size, in_size, **kw)))
                setattr(self, names["w_hh"], nn.Parameter(torch.empty(G * hidden_size, real_h, **kw)))
                if bias:
                    names["b_ih"], names["b_hh"] = "bias_ih" + sfx, "bias_hh" + sfx
                    setattr(self, names["b_ih"], nn.Parameter(torch.empty(G * hidden_size, **kw)))
                    setattr(self, names["b_hh"], nn.Parameter(torch.empty(G * hidden_size, **kw)))
                if proj_size > 0:
                    names["w_hr"] = "weight_hr" + sfx
                    setattr(self, names["w_hr"], nn.Parameter(torch.empty(proj_size, hidden_size, **kw)))
                if peephole:
                    names["w_peep"] = "weight_peep" + sfx
                    setattr(self, names["w_peep"], nn.Parameter(torch.empty(3, hidden_size, **kw)))
                self._names.append(names)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_uniform(self)

    def __setstate__(self, state):
        super().__setstate__(_with_kind(state))
        self.mode = _TORCH_MODES[self.kind]

    def _weights(self) -> list[dict]:
        p = self._parameters  # (getattr costs 0.7 µs a name; a parametrized weight is not here)
        return [{k: p[v] if v in p else getattr(self, v) for k, v in names.items()}
                for names in self._names]

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [list(w.values()) for w in self._weights()]

    def flatten_parameters(self) -> None:
        """Kept for API compatibility with torch.nn; parameters are used in place."""

    @property
    def _all_weights(self) -> list[list[str]]:
        """The parameter names of each layer and direction, as torch.nn.RNNBase's."""
        return [list(names.values()) for names in self._names]

    @property
    def _flat_weights_names(self) -> list[str]:
        return [n for names in self._names for n in names.values()]

    @property
    def _flat_weights(self) -> list[nn.Parameter]:
        return [getattr(self, n) for n in self._flat_weights_names]

    # torch.nn.RNNBase's public argument checks, for code written against it (subclasses,
    # wrappers that validate before calling); forward does its own checks.
    def _mini_batch(self, input: Tensor, batch_sizes: Tensor | None) -> int:
        if batch_sizes is not None:
            return int(batch_sizes[0])
        return input.size(0) if self.batch_first else input.size(1)

    def check_input(self, input: Tensor, batch_sizes: Tensor | None) -> None:
        weight = self._flat_weights[0]
        if input.dtype != weight.dtype and not torch._C._is_any_autocast_enabled():
            raise ValueError(f"input dtype ({input.dtype}) does not match the weights' dtype "
                             f"({weight.dtype})")
        dims = 2 if batch_sizes is not None else 3
        if input.dim() != dims:
            raise RuntimeError(f"input must have {dims} dimensions, got {input.dim()}")
        if input.size(-1) != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected "
                               f"{self.input_size}, got {input.size(-1)}")

    def get_expected_hidden_size(self, input: Tensor,
                                 batch_sizes: Tensor | None) -> tuple[int, int, int]:
        LD, Hs = self._state_sizes()
        return LD, self._mini_batch(input, batch_sizes), Hs

    def check_hidden_size(self, hx: Tensor, expected_hidden_size: tuple[int, int, int],
                          msg: str = "Expected hidden size {}, got {}") -> None:
        if hx.size() != expected_hidden_size:
            raise RuntimeError(msg.format(expected_hidden_size, list(hx.size())))

    def check_forward_args(self, input: Tensor, hidden, batch_sizes: Tensor | None) -> None:
        self.check_input(input, batch_sizes)
        if self.kind != "lstm":
            self.check_hidden_size(hidden, self.get_expected_hidden_size(input, batch_sizes))
            return
        self.check_hidden_size(hidden[0], self.get_expected_hidden_size(input, batch_sizes),
                               "Expected hidden[0] size {}, got {}")
        self.check_hidden_size(hidden[1], self.get_expected_cell_size(input, batch_sizes),
                               "Expected hidden[1] size {}, got {}")

    def permute_hidden(self, hx, permutation: Tensor | None):
        if permutation is None:
            return hx
        if isinstance(hx, (tuple, list)):
            return tuple(h.index_select(1, permutation) for h in hx)
        return hx.index_select(1, permutation)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.peephole:
            s += ", peephole=True"
        if self.kind == "gru_cho":
            s += ", reset_after=False"
        if self.kind == "rnn_relu":
            s += ", nonlinearity='relu'"
        return s

    # ---- forward --------------------------------------------------------------------------

    def _state_sizes(self):
        D = 2 if self.bidirectional else 1
        hs = self.proj_size if self.proj_size > 0 else self.hidden_size
        return self.num_layers * D, hs

    def _check_state(self, name, t, B, width, batched, ref):
        LD, _ = self._state_sizes()
        expected = (LD, B, width) if batched else (LD, width)
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if tuple(t.shape) != expected:
            raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")
        if t.dtype != ref.dtype or t.device != ref.device:
            raise TypeError(f"{name} must match the input's dtype and device ({ref.dtype}, "
                            f"{ref.device}), got ({t.dtype}, {t.device})")

    def forward(self, input, hx=None, lengths=None):
        if hx is None and lengths is None and not torch.is_grad_enabled():
            out = self._inference_forward(input)
            if out is not None:
                return out
        # torch.autocast: the recurrence runs in its dtype (torch's LSTM and RNN do on the CPU,
        # every torch RNN does on CUDA), the weights cast as autocast casts them
        return _autocast.run(self._forward, input, hx, lengths, self._weights())

    def _inference_forward(self, input):
        """forward(input) without autograd, for the commonest call (a padded tensor on the cpu
        backend, zero initial states, no autocast, no inter-layer dropout), or None for any
        other: all layers and directions in one C++ call (recurrent_module_forward), which
        also makes the zero states and shapes the outputs. A 1-step B = 1 LSTM (H = 128) call
        took 40.9 µs with this loop in Python and 24.2 with it in C++ (the kernel: 11).
        Anything unusual (a bad shape or dtype included) takes the general path, which checks
        it."""
        if (type(input) is not Tensor or input.dim() not in (2, 3)
                or input.shape[-1] != self.input_size or 0 in input.shape
                or (self.training and self.dropout > 0 and self.num_layers > 1)
                or not input.is_cpu or torch.is_autocast_enabled("cpu")
                or registry.select("rnn", _CPU, input.dtype) != "cpu"):
            return None
        # the weight names in the order the kernel takes them, six per layer and direction
        # (None: not in this module), derived from _names on first use (so also for a module
        # pickled before)
        names = self.__dict__.get("_kernel_arg_names")
        if names is None:
            names = self._kernel_arg_names = tuple(n.get(k) for n in self._names
                                                   for k in ops._WEIGHT_KEYS)
        p = self._parameters  # (getattr costs 0.7 µs a name; a parametrized weight is not here)
        flat = [(p[n] if n in p else getattr(self, n)) if n else None for n in names]
        w = flat[0]
        if w.dtype != input.dtype or not w.is_cpu or not _ext.direct_call_ok(input, *flat):
            return None
        output, h_n, c_n = _ext._C.recurrent_module_forward(
            self.kind, input, flat, self.num_layers, self.bidirectional, self.batch_first)
        return output, ((h_n, c_n) if self.kind == "lstm" else h_n)

    def _forward(self, input, hx, lengths, weights):
        is_lstm = self.kind == "lstm"
        LD, Hs = self._state_sizes()
        packed_in = isinstance(input, PackedSequence)
        sorted_idx = unsorted_idx = None
        batched = True
        if packed_in:
            if lengths is not None:
                raise ValueError("lengths= cannot be combined with a PackedSequence input")
            data, batch_sizes, sorted_idx, unsorted_idx = input
            self._check_input(data, 2, "PackedSequence.data", weights)
            if not _graph_being_recorded():
                B = int(batch_sizes[0])
            elif sorted_idx is not None:  # traced: batch_sizes[0] is a value, not a shape
                B = sorted_idx.shape[0]
            elif hx is not None:
                B = (hx[0] if is_lstm and isinstance(hx, (tuple, list)) else hx).shape[-2]
            else:
                B = None  # the zero states' op reads it
        else:
            if not isinstance(input, Tensor):
                raise TypeError(f"input must be a Tensor or PackedSequence, got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"input must be 2-D (unbatched: L, {self.input_size}) or 3-D "
                                 f"(batched), got shape {tuple(input.shape)}")
            batched = input.dim() == 3
            x = input if batched else input.unsqueeze(1)
            if batched and self.batch_first:
                x = x.transpose(0, 1)
            self._check_input(x, 3, "input", weights)
            T, B = x.shape[0], x.shape[1]
            if T == 0:
                raise ValueError("input has zero time steps (T = 0); sequences must have length >= 1")
            if lengths is not None:
                lengths = torch.as_tensor(lengths, dtype=torch.int64, device="cpu")
                if lengths.shape != (B,):
                    raise ValueError(f"lengths must have shape ({B},), got {tuple(lengths.shape)}")
            if lengths is not None and B > 0 and (_graph_being_recorded()
                                                  or _ext.is_fake(x) or _ext.is_fake(lengths)):
                # one op whose outputs have data-dependent sizes; it checks the lengths itself
                # (under jit.trace too: the plain packing's Python ints would be recorded as
                # constants, and a trace called with a longer sequence left its last steps 0)
                data, batch_sizes, sorted_idx, unsorted_idx, rows = ops._pack_by_lengths_op(
                    x, lengths)
            elif lengths is not None and B > 0:
                if int(lengths.min()) < 1 or int(lengths.max()) > T:
                    raise ValueError(f"lengths must lie in [1, T={T}], got min {int(lengths.min())}"
                                     f" max {int(lengths.max())}")
                data, batch_sizes, sorted_idx, unsorted_idx, rows = ops._pack_rows(x, lengths)
            else:
                data = x.contiguous().view(T * B, x.shape[2])
                batch_sizes = self._uniform_batch_sizes(T, B)

        if hx is None and B is None:
            h0, c0 = ops._zero_states_op(batch_sizes, data.detach(), LD, Hs,
                                         self.hidden_size if is_lstm else 0)
            c0 = c0 if is_lstm else None
        elif hx is None:
            h0 = data.new_zeros(LD, B, Hs)
            c0 = data.new_zeros(LD, B, self.hidden_size) if is_lstm else None
        else:
            if is_lstm:
                if not (isinstance(hx, (tuple, list)) and len(hx) == 2):  # torch takes a list
                    raise TypeError("LSTM expects hx = (h0, c0), a pair of tensors, got "
                                    f"{type(hx).__name__}" + (f" of length {len(hx)}" if
                                                              isinstance(hx, (tuple, list)) else ""))
                h0, c0 = hx
                self._check_state("h0", h0, B, Hs, batched, data)
                self._check_state("c0", c0, B, self.hidden_size, batched, data)
            else:
                h0, c0 = hx, None
                self._check_state("hx", h0, B, Hs, batched, data)
            if not batched:
                h0 = h0.unsqueeze(1)
                c0 = c0.unsqueeze(1) if c0 is not None else None
            if sorted_idx is not None:
                h0 = h0.index_select(1, sorted_idx)
                c0 = c0.index_select(1, sorted_idx) if c0 is not None else None

        if B is not None and B == 0:  # an empty batch: empty outputs, and the states as given
            width = (2 if self.bidirectional else 1) * Hs
            sources = [data, h0] + ([c0] if is_lstm else []) + [t for w in weights for t in w.values()]
            output = _in_graph(data.new_zeros((0, T, width) if self.batch_first else (T, 0, width)), sources)
            h_n = _in_graph(h0.clone(), sources)
            return output, ((h_n, _in_graph(c0.clone(), sources)) if is_lstm else h_n)
        out, h_n, c_n = ops._recurrence(self.kind, data, batch_sizes, h0, c0, weights,
                                        self.num_layers, self.bidirectional, self.dropout,
                                        self.training, check=False)
        if unsorted_idx is not None:
            h_n = h_n.index_select(1, unsorted_idx)
            c_n = c_n.index_select(1, unsorted_idx) if c_n is not None else None

        if packed_in:
            output = PackedSequence(out, batch_sizes, sorted_idx, unsorted_idx)
        elif lengths is not None:
            output = ops._unpack_rows(out, rows, T, B)
            if not batched:
                output = output.squeeze(1)
            elif self.batch_first:
                output = output.transpose(0, 1)
        else:
            output = out.view(T, B, -1)
            if not batched:  # (L, H_in) in, (L, H_out) out, whatever batch_first says
                output = output.squeeze(1)
            elif self.batch_first:
                output = output.transpose(0, 1)
        if not batched:
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        return output, ((h_n, c_n) if is_lstm else h_n)

    def _uniform_batch_sizes(self, T: int, B: int) -> Tensor:
        """batch_sizes = [B] * T of a padded input, kept from the last call: the kernels only
        read it, and building it each call was ~2 µs of a ~100 µs call at B = 1."""
        if not _ext.direct_call_ok():
            # traced, transformed (torch.func) or under a mode (FakeTensorMode): the tensor made
            # here is a wrapper or a fake that must not outlive the call in the module
            return torch.full((T,), B, dtype=torch.int64, device="cpu")
        cached = self.__dict__.get("_batch_sizes_cache")
        if cached is None or cached[0] != (T, B):
            # never an inference tensor (a first call under inference_mode), which a later
            # training call could not save for backward
            with torch.inference_mode(False):
                cached = ((T, B), torch.full((T,), B, dtype=torch.int64, device="cpu"))
            self.__dict__["_batch_sizes_cache"] = cached
        return cached[1]

    def _check_input(self, x, dim, name, weights):
        if x.dim() != dim or x.shape[-1] != self.input_size:
            raise ValueError(f"{name} must have input_size={self.input_size} features in its last "
                             f"dimension, got shape {tuple(x.shape)}")
        p = weights[0]["w_ih"]
        if x.dtype != p.dtype or x.device != p.device:
            raise TypeError(f"{name} has dtype/device ({x.dtype}, {x.device}) but the module's "
                            f"parameters are ({p.dtype}, {p.device})")

    def step(self, x_t: Tensor, state=None):
        """Streaming: advance every layer by one time step. x_t is (B, input_size) (or
        (input_size,)); returns (y_t, new_state) with the state in forward()'s hx format, so
        calling step() T times equals forward() on the whole sequence."""
        if self.bidirectional:
            raise RuntimeError("step() needs a unidirectional module: a bidirectional layer's "
                               "reverse direction depends on the future")
        if x_t.dim() not in (1, 2) or x_t.shape[-1] != self.input_size:
            raise ValueError(f"x_t must be (batch, {self.input_size}) or ({self.input_size},), "
                             f"got {tuple(x_t.shape)}")
        refresh_weights(self)  # step() is not a __call__: weight_norm's hook must run here
        fast = self._step_kernel(x_t, state)
        if fast is not None:
            return fast
        seq = x_t.unsqueeze(1) if self.batch_first and x_t.dim() == 2 else x_t.unsqueeze(0)
        y, state = self.forward(seq, state)
        return (y.squeeze(1) if self.batch_first and x_t.dim() == 2 else y.squeeze(0)), state

    def _step_kernel(self, x_t: Tensor, state):
        """step() through the one-step C++ kernel (``_C.cell_step``), layer by layer, when it
        applies: float32/64 or bfloat16 on the cpu backend, eager, no peephole, projection, Cho GRU or
        training-mode dropout, and a well-formed state. With gradients each layer's steps form
        a chain as a cell's do (ops.rnn.cell_step; the returned state tensors carry the
        layers' chains). None otherwise (then forward() runs, and reports any bad input)."""
        if (self.peephole or self.proj_size or self.kind == "gru_cho"
                or (self.training and self.dropout > 0) or not _ext.direct_call_ok()
                or x_t.dtype not in _STEP_DTYPES or not x_t.is_cpu
                or x_t.shape[-1] != self.input_size or torch.is_autocast_enabled("cpu")):
            return None
        unbatched = x_t.dim() == 1
        x = x_t.unsqueeze(0) if unbatched else x_t
        B, L, H = x.shape[0], self.num_layers, self.hidden_size
        if B < 1:
            return None
        lstm = self.kind == "lstm"
        chains = None
        if state is None:
            h = c = x.new_zeros(L, B, H)
        else:
            well_formed = (isinstance(state, (tuple, list)) and len(state) == 2
                           and all(isinstance(t, Tensor) for t in state)) if lstm \
                else isinstance(state, Tensor)
            if not well_formed:
                return None
            h, c = state if lstm else (state, None)
            chains = ops.chain_of(h, c)
            if unbatched:
                h, c = h.unsqueeze(1), (c.unsqueeze(1) if lstm else None)
        state_tensors = [h] + ([c] if lstm else [])
        weights = self._weights()
        params = [p for w in weights for p in w.values()]
        if any(t.shape != (L, B, H) for t in state_tensors) or not ops.cell_step_applies(
                self.kind, x, h, c, dict(enumerate(params))):
            return None
        grad = _ext.needs_grad(x, *state_tensors, *params)
        if not isinstance(chains, list) or len(chains) != L:
            chains = None
        hs, cs, new_chains = [], [], []
        for k, w in enumerate(weights):
            w4 = (w["w_ih"], w["w_hh"], w.get("b_ih"), w.get("b_hh"))
            if grad:
                hn, cn = ops.cell_step(self.kind, x, h[k], c[k] if lstm else None, w4,
                                       chains[k] if chains is not None else None)
                new_chains.append(ops.chain_of(hn))
            else:
                hn, cn, _ = _ext._C.cell_step(self.kind, x, h[k], c[k] if lstm else None, *w4, False)
            hs.append(hn)
            cs.append(cn)
            x = hn
        h_n = torch.stack(hs)  # (a copy: with one layer x_t's output is hs[0] itself)
        c_n = torch.stack(cs) if lstm else None
        if unbatched:
            x, h_n, c_n = x.squeeze(0), h_n.squeeze(1), (c_n.squeeze(1) if lstm else None)
        if grad:
            ops.set_chain(new_chains, h_n, c_n)
        return x, ((h_n, c_n) if lstm else h_n)


class RNN(_RecurrentBase):
    """Elman RNN, drop-in for torch.nn.RNN."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__("rnn_" + nonlinearity, input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, device=device, dtype=dtype)


class LSTM(_RecurrentBase):
    """LSTM, drop-in for torch.nn.LSTM; ``peephole=True`` adds Gers–Schmidhuber peepholes."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None,
                 peephole=False):
        super().__init__("lstm", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, peephole, device, dtype)

    def get_expected_cell_size(self, input: Tensor,
                               batch_sizes: Tensor | None) -> tuple[int, int, int]:
        return self._state_sizes()[0], self._mini_batch(input, batch_sizes), self.hidden_size


class GRU(_RecurrentBase):
    """GRU, drop-in for torch.nn.GRU; ``reset_after=False`` is the Cho et al. 2014 variant."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device=None, dtype=None, reset_after=True):
        self.reset_after = reset_after
        super().__init__("gru" if reset_after else "gru_cho", input_size, hidden_size, num_layers,
                         bias, batch_first, dropout, bidirectional, device=device, dtype=dtype)


# ---------------------------------------------------------------- cells -------------------

class _CellBase(nn.Module):
    def __init__(self, mode, input_size, hidden_size, bias=True, device=None, dtype=None):
        super().__init__()
        self.kind, self.input_size, self.hidden_size, self.bias = mode, input_size, hidden_size, bias
        G = gate_count(mode)
        kw = {"device": device, "dtype": dtype}
        self.weight_ih = nn.Parameter(torch.empty(G * hidden_size, input_size, **kw))
        self.weight_hh = nn.Parameter(torch.empty(G * hidden_size, hidden_size, **kw))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(G * hidden_size, **kw))
            self.bias_hh = nn.Parameter(torch.empty(G * hidden_size, **kw))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_uniform(self)

    def __setstate__(self, state):
        state = _with_kind(state, self._pickled_kind(state))
        state.pop("mode", None)  # (torch's cells have none; seqkern's name is `kind`)
        super().__setstate__(state)

    @staticmethod
    def _pickled_kind(state: dict) -> str:
        """The kind of a torch.nn cell's pickled state (it has no `kind`), by class."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}" + ("" if self.bias else ", bias=False")

    def _run(self, x, h, c):
        out = self._step_direct(x, h, c)
        if out is not None:
            return out
        params = {"w_ih": self.weight_ih, "w_hh": self.weight_hh}
        # (the biases as they are now, as torch's cells read them: a bias=False cell may have
        # been given some since)
        for key, b in (("b_ih", self.bias_ih), ("b_hh", self.bias_hh)):
            if b is not None:
                params[key] = b
        return _autocast.run(self._run_with, x, h, c, params)  # torch.autocast: as the layers

    def _params_well_formed(self, x, w_ih, w_hh, b_ih, b_hh) -> bool:
        """Whether the parameters have the shapes, and x's dtype and device, that the one-step
        kernel takes. When not, the general path runs and raises its own errors, so a bad
        parameter reads the same with and without gradients."""
        H = self.hidden_size
        GH = gate_count(self.kind) * H
        dt = x.dtype
        if (w_ih.shape != (GH, self.input_size) or w_hh.shape != (GH, H) or w_ih.dtype != dt
                or w_hh.dtype != dt or not w_ih.is_cpu or not w_hh.is_cpu):
            return False
        for b in (b_ih, b_hh):
            if b is not None and (b.dtype != dt or not b.is_cpu or b.shape != (GH,)):
                return False
        return True

    def _step_direct(self, x, h, c):
        """(h', c') straight from ``_C.cell_step`` (with gradients, through ops.cell_step) for
        the common call: a plain cpu float32/64 or bfloat16 input of any number of rows, states
        absent or of the right shape, dtype and device, well-formed parameters, no autocast, no
        vmap-batched tensor that needs a gradient, the cpu backend. None for anything else,
        which the general path runs and checks (so errors read the same either way). The
        general path spent about 16 µs of Python on an RNNCell (H = 128) call whose kernel
        takes 4."""
        if (type(x) is not Tensor or self.kind == "gru_cho" or x.dtype not in _STEP_DTYPES
                or not x.is_cpu or torch.is_autocast_enabled("cpu")):
            return None
        shape, H = x.shape, self.hidden_size
        batched = len(shape) == 2
        if not (batched or len(shape) == 1) or shape[-1] != self.input_size:
            return None
        B = shape[0] if batched else 1
        if B < 1:
            return None
        state_shape = (B, H) if batched else (H,)
        for t in (h, c):
            if t is not None and (type(t) is not Tensor or t.shape != state_shape
                                  or t.dtype != x.dtype or not t.is_cpu):
                return None
        if (h is None) != (c is None) and self.kind == "lstm":
            return None
        p = self._parameters  # (a parametrized or weight-normed weight is not in it: None)
        w_ih, w_hh, b_ih, b_hh = p.get("weight_ih"), p.get("weight_hh"), p.get("bias_ih"), p.get("bias_hh")
        if (w_ih is None or w_hh is None or (self.bias and (b_ih is None or b_hh is None))
                or not self._params_well_formed(x, w_ih, w_hh, b_ih, b_hh)):
            return None
        if (not _ext.direct_call_ok(x, h, c, w_ih, w_hh, b_ih, b_hh)
                or registry.select("rnn", _CPU) != "cpu"):
            return None
        grad = _ext.needs_grad(x, h, c, w_ih, w_hh, b_ih, b_hh)
        if grad and _ext.batched(x, h, c):
            return None
        xb = x if batched else x.unsqueeze(0)
        chain = None
        if h is None:
            h = xb.new_zeros(B, H)
            c = xb.new_zeros(B, H) if self.kind == "lstm" else None
        elif not batched:
            chain = ops.chain_of(h, c)
            h = h.unsqueeze(0)
            c = c.unsqueeze(0) if c is not None else None
        if grad:
            h_n, c_n = ops.cell_step(self.kind, xb, h, c, (w_ih, w_hh, b_ih, b_hh), chain)
        else:
            h_n, c_n, _ = _ext._C.cell_step(self.kind, xb, h, c, w_ih, w_hh, b_ih, b_hh, False)
        if not batched:
            h_n, c_n = _unbatch(h_n, c_n)
        return h_n, (c_n if self.kind == "lstm" else None)

    def _run_with(self, x, h, c, params):
        if x.dim() not in (1, 2) or x.shape[-1] != self.input_size:
            raise ValueError(f"input must be (batch, {self.input_size}) or ({self.input_size},), "
                             f"got {tuple(x.shape)}")
        w = params["w_ih"]
        if x.dtype != w.dtype or x.device != w.device:
            raise TypeError(f"input has dtype/device ({x.dtype}, {x.device}) but the module's "
                            f"parameters are ({w.dtype}, {w.device})")
        batched = x.dim() == 2
        xb = x if batched else x.unsqueeze(0)
        B = xb.shape[0]
        chain = None
        if h is None:
            h = xb.new_zeros(B, self.hidden_size)
            c = xb.new_zeros(B, self.hidden_size) if self.kind == "lstm" else None
        else:
            for name, t in (("hx", h), ("cx", c)):
                if t is None:
                    continue
                exp = (B, self.hidden_size) if batched else (self.hidden_size,)
                if tuple(t.shape) != exp:
                    raise ValueError(f"{name} must have shape {exp}, got {tuple(t.shape)}")
                if t.dtype != x.dtype or t.device != x.device:
                    raise TypeError(f"{name} must match the input's dtype and device ({x.dtype}, "
                                    f"{x.device}), got ({t.dtype}, {t.device})")
            if not batched:
                # (eager only: a graph being captured must not read the states' grad_fn)
                chain = ops.chain_of(h, c) if _ext.direct_call_ok() else None
                h = h.unsqueeze(0)
                c = c.unsqueeze(0) if c is not None else None
        w4 = (params["w_ih"], params["w_hh"], params.get("b_ih"), params.get("b_hh"))
        if B == 0:  # an empty batch, as torch's cells allow
            sources = [xb, h, c] + list(params.values())
            h_n = _in_graph(xb.new_zeros(0, self.hidden_size), sources)
            c_n = _in_graph(xb.new_zeros(0, self.hidden_size), sources) if self.kind == "lstm" else None
        elif self._params_well_formed(xb, *w4) and ops.cell_step_applies(self.kind, xb, h, c,
                                                                         params):
            h_n, c_n = ops.cell_step(self.kind, xb, h, c, w4, chain)
        elif (not _ext.direct_call_ok() and ops.cell_step_op_applies(self.kind, xb)
              and self._params_well_formed(xb, *w4)):
            h_n, c_n = ops.cell_step_captured(self.kind, xb, h, c, w4)
        else:
            _, h_n, c_n = ops.recurrent_layer(self.kind, xb,
                                              torch.full((1,), B, dtype=torch.int64, device="cpu"), h, c, params)
        if not batched:
            h_n, c_n = _unbatch(h_n, c_n, chain=_ext.direct_call_ok())  # (eager only, above)
        return h_n, c_n


def _unbatch(h_n: Tensor, c_n: Tensor | None, chain: bool = True):
    """(h', c') of a one-row step without their batch dimension, carrying the step's chain (see
    ops.rnn.cell_step) for the next call, which unsqueezes them again; `chain` False where a
    graph is being captured, which must not read the states' grad_fn."""
    found = ops.chain_of(h_n) if chain else None
    h_n = h_n.squeeze(0)
    c_n = c_n.squeeze(0) if c_n is not None else None
    if found is not None:
        ops.set_chain(found, h_n, c_n)
    return h_n, c_n


def _in_graph(empty: Tensor, sources) -> Tensor:
    """`empty` (no elements) as a function of `sources`, as torch's empty-batch results are: a
    loss built on it back-propagates (zero gradients) instead of finding no grad_fn."""
    if not torch.is_grad_enabled():
        return empty
    for t in sources:
        if t is not None and t.requires_grad:
            empty = empty + t.sum() * 0  # a scalar broadcast over no elements
    return empty


class RNNCell(_CellBase):
    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", device=None,
                 dtype=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__("rnn_" + nonlinearity, input_size, hidden_size, bias, device, dtype)

    @staticmethod
    def _pickled_kind(state: dict) -> str:
        return "rnn_" + state.get("nonlinearity", "tanh")

    def extra_repr(self) -> str:  # as torch's: the nonlinearity when it is not tanh
        s = super().extra_repr()
        return s if self.nonlinearity == "tanh" else s + f", nonlinearity={self.nonlinearity}"

    def forward(self, input, hx=None):
        return self._run(input, hx, None)[0]


class LSTMCell(_CellBase):
    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None):
        super().__init__("lstm", input_size, hidden_size, bias, device, dtype)

    @staticmethod
    def _pickled_kind(state: dict) -> str:
        return "lstm"

    def forward(self, input, hx=None):
        if hx is not None and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError("LSTMCell expects hx = (h, c), a pair of tensors, got "
                            f"{type(hx).__name__}" + (f" of length {len(hx)}"
                                                       if isinstance(hx, (tuple, list)) else ""))
        h, c = (None, None) if hx is None else hx
        if hx is not None and (h is None or c is None):
            raise TypeError("LSTMCell expects hx = (h, c) with both tensors given, got "
                            f"({type(h).__name__}, {type(c).__name__})")
        return self._run(input, h, c)


class GRUCell(_CellBase):
    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None,
                 reset_after=True):
        self.reset_after = reset_after
        super().__init__("gru" if reset_after else "gru_cho", input_size, hidden_size, bias,
                         device, dtype)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("reset_after", self.kind == "gru")

    @staticmethod
    def _pickled_kind(state: dict) -> str:
        return "gru" if state.get("reset_after", True) else "gru_cho"

    def forward(self, input, hx=None):
        return self._run(input, hx, None)[0]
