"""The modules with the parts of PyTorch around them that are not autograd or torch.compile
(covered per family): torch.jit, default devices and device contexts."""
import pytest
import torch

import seqkern
import seqkern.nn as snn
from seqkern import _ext

E = 8

MODULES = {
    "LSTM": (lambda: snn.LSTM(E, E, num_layers=2, batch_first=True), lambda m, x: m(x)[0]),
    "GRU": (lambda: snn.GRU(E, E, batch_first=True), lambda m, x: m(x)[0]),
    "RNN": (lambda: snn.RNN(E, E, batch_first=True), lambda m, x: m(x)[0]),
    "LSTMCell": (lambda: snn.LSTMCell(E, E), lambda m, x: m(x[:, 0])[0]),
    "GRUCell": (lambda: snn.GRUCell(E, E), lambda m, x: m(x[:, 0])),
    "MultiheadAttention": (lambda: snn.MultiheadAttention(E, 2, batch_first=True),
                           lambda m, x: m(x, x, x, need_weights=False)[0]),
    "CausalSelfAttention": (lambda: snn.CausalSelfAttention(E, 2), lambda m, x: m(x)),
    "CausalConv1d": (lambda: snn.CausalConv1d(E, E, 3, dilation=2),
                     lambda m, x: m(x.transpose(1, 2))),
}


class _Apply(torch.nn.Module):
    def __init__(self, module, fn):
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, x):
        return self.fn(self.module, x)


@pytest.mark.parametrize("name", MODULES)
def test_jit_trace_passes_its_check_and_a_no_grad_trace_trains(name):
    """torch.jit.trace's default check re-traces under no_grad. The ops' `save` (keep what the
    backward needs) followed the grad mode, so the two graphs differed ("Graphs differed across
    invocations") and a module traced under no_grad (the deployment idiom) raised in backward.
    Under tracing the ops now always keep it."""
    make, fn = MODULES[name]
    model = _Apply(make(), fn)
    x = torch.randn(2, 5, E)
    traced = torch.jit.trace(model, x)  # (with its check)
    torch.testing.assert_close(traced(x), model(x))
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
    x2 = torch.randn(3, 5, E, requires_grad=True)  # (another batch size)
    traced(x2).square().sum().backward()
    g_traced = [x2.grad] + [p.grad for p in model.parameters()]
    model.zero_grad()
    x2.grad = None
    model(x2).square().sum().backward()
    g_eager = [x2.grad] + [p.grad for p in model.parameters()]
    for a, b in zip(g_traced, g_eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", MODULES)
def test_jit_script_is_refused_with_a_clear_error(name):
    model = torch.nn.Sequential(torch.nn.Identity(), MODULES[name][0]())
    with pytest.raises(RuntimeError, match=f"seqkern.nn.{name} does not support torch.jit.script"):
        torch.jit.script(model)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "LSTMCell", "GRUCell", "MultiheadAttention",
                                  "CausalSelfAttention", "CausalConv1d"])
@pytest.mark.parametrize("grad", [False, True])
def test_forward_under_a_meta_device_context(name, grad):
    """`with torch.device("meta")` (shape inference) made the batch_sizes the layers build on
    the meta device, and the cpu path then called .item() on them. Meta modules give meta
    outputs of the eager shapes there, and cpu modules cpu results."""
    make, fn = MODULES[name]
    model = make()
    x = torch.randn(2, 5, E)
    with torch.set_grad_enabled(grad):
        expected = fn(model, x)
        with torch.device("meta"):
            out = fn(model, x)
            meta_model = make()
            meta_out = fn(meta_model, torch.empty(2, 5, E))
    torch.testing.assert_close(out, expected)
    assert meta_out.device.type == "meta" and meta_out.shape == expected.shape


def test_the_fast_paths_run_under_a_default_device_but_not_other_function_modes():
    """torch.set_default_device / `with torch.device(...)` install a TorchFunctionMode that
    only fills in factory calls' devices; with it active every call took the general path (an
    LSTMCell call 99 µs instead of 14, torch's 31). Any other function mode still needs the
    custom ops, which it can see."""
    from torch.overrides import TorchFunctionMode

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    assert _ext.direct_call_ok()
    with torch.device("cpu"):
        assert _ext.direct_call_ok()
        with Watch():
            assert not _ext.direct_call_ok()
    with Watch():
        assert not _ext.direct_call_ok()
    cell, x = snn.LSTMCell(E, E), torch.randn(3, E, requires_grad=True)
    h, c = cell(x)
    with torch.device("cpu"):
        h2, c2 = cell(x)
        h2.sum().backward()
    torch.testing.assert_close((h2, c2), (h, c))
    assert x.grad is not None


@pytest.mark.parametrize("packed", [False, True], ids=["lengths", "PackedSequence"])
def test_jit_trace_of_a_variable_length_call_serves_other_lengths(packed):
    """A trace records Python ints as constants: the plain packing's maximum length was one
    (a trace made with lengths [4, 3, 2] and called with [5, 3, 2] left row 0's last step 0,
    silently), and a PackedSequence's batch size another (a new batch raised). Both now come
    from ops the trace records, as under torch.compile."""
    from torch.nn.utils.rnn import pack_padded_sequence

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = snn.LSTM(4, 6, batch_first=True)

        def forward(self, x, lengths):
            if packed:
                return self.lstm(pack_padded_sequence(x, lengths, batch_first=True,
                                                      enforce_sorted=False))[0].data
            return self.lstm(x, lengths=lengths)[0]

    model = Model()
    with torch.no_grad():
        traced = torch.jit.trace(model, (torch.randn(3, 5, 4), torch.tensor([4, 3, 2])),
                                 check_trace=False)
        for B, lengths in ((3, [5, 3, 2]), (3, [3, 3, 2]), (4, [5, 2, 2, 1]), (1, [5])):
            x, n = torch.randn(B, 5, 4), torch.tensor(lengths)
            torch.testing.assert_close(traced(x, n), model(x, n))
