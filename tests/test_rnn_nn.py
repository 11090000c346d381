"""seqkern.nn recurrent modules as drop-ins for torch.nn: same parameters, outputs, states and
gradients across configurations; PackedSequence and lengths=; cells; step(); torch.compile."""
import copy
import io
import itertools
import random

import pytest
import torch

from conftest import requires_cpu_ext, stable_seed
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import seqkern
import seqkern.nn as snn
from seqkern import registry
from seqkern.ops import rnn as ops

PAIRS = {"lstm": (torch.nn.LSTM, snn.LSTM), "gru": (torch.nn.GRU, snn.GRU),
         "rnn": (torch.nn.RNN, snn.RNN)}


def make_pair(kind, I, H, dtype=torch.float64, **kw):
    tcls, scls = PAIRS[kind]
    t = tcls(I, H, **kw).to(dtype)
    s = scls(I, H, **kw).to(dtype)
    s.load_state_dict(t.state_dict())
    return t, s


def count_calls(monkeypatch, name):
    """A list that grows by one at each call of the extension's function `name`."""
    calls, real = [], getattr(seqkern._ext._C, name)
    monkeypatch.setattr(seqkern._ext._C, name, lambda *a: calls.append(1) or real(*a),
                        raising=False)
    return calls


def _flat(o):
    if isinstance(o, torch.nn.utils.rnn.PackedSequence):
        return [o.data]
    if isinstance(o, (tuple, list)):
        return [y for x in o for y in _flat(x)]
    return [o]


CONFIGS = list(itertools.product(["lstm", "gru", "rnn"], [1, 2, 3], [False, True], [False, True]))
random.Random(0).shuffle(CONFIGS)


@pytest.mark.parametrize("kind,layers,bidir,batch_first", CONFIGS[:24])
def test_module_matches_torch(kind, layers, bidir, batch_first):
    rng = random.Random(stable_seed(kind, layers, bidir, batch_first))
    B, I, H = rng.choice([1, 3, 17]), rng.choice([1, 3, 17, 64]), rng.choice([1, 3, 17, 64])
    T = rng.choice([1, 2, 7, 40])
    kw = dict(num_layers=layers, bidirectional=bidir, batch_first=batch_first, dropout=0.3)
    if kind == "lstm" and H > 1 and rng.random() < 0.5:
        kw["proj_size"] = max(1, H // 3)
    if kind == "rnn":
        kw["nonlinearity"] = rng.choice(["tanh", "relu"])
    t, s = make_pair(kind, I, H, **kw)
    t.eval(), s.eval()  # dropout off in eval, as in torch
    shape = (B, T, I) if batch_first else (T, B, I)
    x1 = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    D = 2 if bidir else 1
    Hs = kw.get("proj_size", 0) or H
    h0 = torch.randn(layers * D, B, Hs, dtype=torch.float64)
    hx = (h0, torch.randn(layers * D, B, H, dtype=torch.float64)) if kind == "lstm" else h0
    o1, o2 = t(x1, hx), s(x2, hx)
    for a, b in zip(_flat(o1), _flat(o2)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    g = [torch.randn_like(a) for a in _flat(o1)]
    sum((a * w).sum() for a, w in zip(_flat(o1), g)).backward()
    sum((a * w).sum() for a, w in zip(_flat(o2), g)).backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-10, rtol=1e-8)
    for (n1, p1), (n2, p2) in zip(t.named_parameters(), s.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p1.grad, p2.grad, atol=1e-9, rtol=1e-8, msg=n1)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("bidir", [False, True])
@pytest.mark.parametrize("enforce_sorted", [False, True])
def test_packed_sequence_matches_torch(kind, bidir, enforce_sorted):
    t, s = make_pair(kind, 5, 7, num_layers=2, bidirectional=bidir)
    lengths = torch.tensor([9, 7, 7, 3, 1]) if enforce_sorted else torch.tensor([3, 9, 1, 7, 7])
    x = torch.randn(9, 5, 5, dtype=torch.float64)
    p = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    p1 = torch.nn.utils.rnn.PackedSequence(p.data.clone().requires_grad_(True), p.batch_sizes,
                                           p.sorted_indices, p.unsorted_indices)
    p2 = torch.nn.utils.rnn.PackedSequence(p.data.clone().requires_grad_(True), p.batch_sizes,
                                           p.sorted_indices, p.unsorted_indices)
    o1, o2 = t(p1), s(p2)
    assert isinstance(o2[0], torch.nn.utils.rnn.PackedSequence)
    for a, b in zip(_flat(o1), _flat(o2)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    sum(a.sum() for a in _flat(o1)).backward()
    sum(a.sum() for a in _flat(o2)).backward()
    torch.testing.assert_close(p1.data.grad, p2.data.grad, atol=1e-10, rtol=1e-8)


def test_lengths_keyword_equals_packed():
    t, s = make_pair("gru", 4, 6, batch_first=True, bidirectional=True)
    x = torch.randn(3, 8, 4, dtype=torch.float64)
    lengths = torch.tensor([2, 8, 5])
    y, h = s(x, lengths=lengths)
    yt, ht = t(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    yt, _ = pad_packed_sequence(yt, batch_first=True, total_length=8)
    torch.testing.assert_close(y, yt, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(h, ht, atol=1e-10, rtol=1e-8)
    assert (y[0, 2:] == 0).all()  # padding gives zeros, never leaks into the state


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input(kind, batch_first):
    """(L, H_in) input gives (L, H_out) output whatever batch_first says, as in torch."""
    t, s = make_pair(kind, 3, 4, num_layers=2, batch_first=batch_first)
    x = torch.randn(6, 3, dtype=torch.float64)
    for a, b in zip(_flat(t(x)), _flat(s(x))):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_state_dict_both_ways(kind):
    t, s = make_pair(kind, 3, 4, num_layers=2, bidirectional=True, dtype=torch.float32)
    assert list(t.state_dict()) == list(s.state_dict())
    t2 = PAIRS[kind][0](3, 4, num_layers=2, bidirectional=True)
    t2.load_state_dict(s.state_dict())
    for a, b in zip(t2.parameters(), s.parameters()):
        assert torch.equal(a, b)


def test_float32_training_matches_torch():
    t, s = make_pair("lstm", 33, 40, dtype=torch.float32, num_layers=2)
    x = torch.randn(25, 4, 33)
    y1, _ = t(x)
    y2, _ = s(x)
    torch.testing.assert_close(y1, y2, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_cells_match_torch(kind):
    tcls = {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell, "rnn": torch.nn.RNNCell}[kind]
    scls = {"lstm": snn.LSTMCell, "gru": snn.GRUCell, "rnn": snn.RNNCell}[kind]
    t, s = tcls(5, 7).double(), scls(5, 7).double()
    s.load_state_dict(t.state_dict())
    x = torch.randn(3, 5, dtype=torch.float64)
    h = torch.randn(3, 7, dtype=torch.float64)
    hx = (h, torch.randn(3, 7, dtype=torch.float64)) if kind == "lstm" else h
    for a, b in zip(_flat(t(x, hx)), _flat(s(x, hx))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    for a, b in zip(_flat(t(x[0])), _flat(s(x[0]))):  # unbatched, zero state
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@requires_cpu_ext
@pytest.mark.parametrize("kind,kw", [("lstm", {}), ("gru", {}), ("rnn", {}),
                                     ("rnn", {"nonlinearity": "relu"}), ("lstm", {"bias": False})])
@pytest.mark.parametrize("B", [1, 2, 4, 5, 9, 16, 17, 20])
@pytest.mark.parametrize("I,H", [(5, 7), (300, 33), (64, 129), (520, 513)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cells_inference_step_kernel(kind, kw, B, I, H, dtype, monkeypatch):
    """A cell call runs the one-step kernel (_C.cell_step: fused up to 4 rows; in float32 row
    products over the weights to 16 rows, or 32 with I, H ≥ 512; else two GEMMs; then the
    cell), with or without gradients, and equals torch's cell."""
    tcls = {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell, "rnn": torch.nn.RNNCell}[kind]
    scls = {"lstm": snn.LSTMCell, "gru": snn.GRUCell, "rnn": snn.RNNCell}[kind]
    t, s = tcls(I, H, **kw).to(dtype), scls(I, H, **kw).to(dtype)
    s.load_state_dict(t.state_dict())
    calls = count_calls(monkeypatch, "cell_step")
    x = torch.randn(B, I, dtype=dtype)
    hx = torch.randn(B, H, dtype=dtype)
    hx = (hx, torch.randn(B, H, dtype=dtype)) if kind == "lstm" else hx
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-6, rtol=1e-5)
    with torch.no_grad():
        for args in ((x, hx), (x,)) + (((x[0],),) if B == 1 else ()):  # state given, zero, unbatched
            for a, b in zip(_flat(t(*args)), _flat(s(*args))):
                torch.testing.assert_close(b, a, **tol)
    assert len(calls) == (3 if B == 1 else 2)
    out = s(x, hx)  # parameters require grad: the kernel saves what the backward needs
    assert _flat(out)[0].requires_grad and len(calls) == (3 if B == 1 else 2) + 1


@requires_cpu_ext
@pytest.mark.parametrize("kind,kw", [("lstm", {"num_layers": 2}), ("gru", {}),
                                     ("rnn", {"num_layers": 3, "nonlinearity": "relu"}),
                                     ("lstm", {"batch_first": True, "bias": False})])
@pytest.mark.parametrize("B", [1, 3, 5, None], ids=["B1", "B3", "B5", "unbatched"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_step_kernel_streaming_equals_forward(kind, kw, B, dtype, monkeypatch):
    """step() without gradients runs the one-step kernel layer by layer, and T steps equal
    forward() over the sequence, outputs and final state."""
    t, s = make_pair(kind, 19, 33, dtype, **kw)
    calls = count_calls(monkeypatch, "cell_step")
    bf = s.batch_first
    x = torch.randn(*((B,) if B else ()), 6, 19, dtype=dtype)
    if not bf and B:
        x = x.transpose(0, 1)
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        y, state = s(x)
        st, ys = None, []
        for i in range(6):
            yt, st = s.step(x[:, i] if bf and B else x[i], st)
            ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, 1 if bf and B else 0), y, **tol)
    for a, b in zip(_flat(st), _flat(state)):
        torch.testing.assert_close(a, b, **tol)
    assert len(calls) == 6 * s.num_layers


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_cells_empty_batch(kind):
    tcls = {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell, "rnn": torch.nn.RNNCell}[kind]
    scls = {"lstm": snn.LSTMCell, "gru": snn.GRUCell, "rnn": snn.RNNCell}[kind]
    t, s = tcls(5, 7), scls(5, 7)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            want, got = _flat(t(torch.empty(0, 5))), _flat(s(torch.empty(0, 5)))
        assert [a.shape for a in got] == [a.shape for a in want]
        assert [a.requires_grad for a in got] == [a.requires_grad for a in want]
    x = torch.empty(0, 5, requires_grad=True)  # a loss on an empty batch back-propagates, as torch's
    sum(a.sum() for a in _flat(s(x))).backward()
    assert x.grad.shape == (0, 5) and not s.weight_hh.grad.any()


@pytest.mark.parametrize("state", [lambda: torch.zeros(1, 1, 7), lambda: "x",
                                   lambda: (torch.zeros(1, 1, 7),)])
def test_step_malformed_state_raises_clear_error(state):
    with pytest.raises(TypeError, match=r"LSTM expects hx = \(h0, c0\)"):
        snn.LSTM(5, 7).step(torch.randn(1, 5), state())


@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input_with_lengths(batch_first):
    t, s = make_pair("gru", 5, 7, batch_first=batch_first)
    x = torch.randn(6, 5, dtype=torch.float64)
    y, h = s(x, lengths=[6])
    want_y, want_h = t(x)
    assert y.shape == want_y.shape and h.shape == want_h.shape
    torch.testing.assert_close(y, want_y)


@requires_cpu_ext
def test_cell_step_rejects_bad_input():
    C = seqkern._ext._C
    x, h = torch.randn(2, 5), torch.randn(2, 7)
    w_ih, w_hh = torch.randn(28, 5), torch.randn(28, 7)
    with pytest.raises(RuntimeError, match=r"x must be \(B, I\)"):
        C.cell_step("lstm", torch.randn(1, 2, 5), h, h, w_ih, w_hh, None, None, False)
    with pytest.raises(RuntimeError, match=r"h must be \(2, hidden_size\)"):
        C.cell_step("lstm", x, torch.randn(3, 7), h, w_ih, w_hh, None, None, False)
    with pytest.raises(RuntimeError, match="lstm needs c"):
        C.cell_step("lstm", x, h, None, w_ih, w_hh, None, None, False)
    with pytest.raises(RuntimeError, match="w_ih must be"):
        C.cell_step("lstm", x, h, h, torch.randn(27, 5), w_hh, None, None, False)
    with pytest.raises(RuntimeError, match="must be a CPU tensor of x's dtype"):
        C.cell_step("lstm", x, h.double(), h, w_ih, w_hh, None, None, False)
    with pytest.raises(RuntimeError, match=r"b_ih must be \(28,\)"):
        C.cell_step("lstm", x, h, h, w_ih, w_hh, torch.randn(27), None, True)
    with pytest.raises(RuntimeError, match="gru_cho is not supported"):
        C.cell_step("gru_cho", x, h, None, torch.randn(21, 5), torch.randn(21, 7), None, None, False)
    saved = torch.randn(2, 35)  # LSTM: 5·H
    with pytest.raises(RuntimeError, match=r"saved must be a CPU Float tensor of shape \[2, 35\]"):
        C.cell_backward("lstm", h, h, saved[:, :28], h, h, w_ih, w_hh, True)
    with pytest.raises(RuntimeError, match=r"dh must be a CPU Float tensor of shape \[2, 7\]"):
        C.cell_backward("rnn_tanh", torch.randn(2, 6), None, h, h, None,
                        torch.randn(7, 5), torch.randn(7, 7), True)
    with pytest.raises(RuntimeError, match="lstm needs c_prev"):
        C.cell_backward("lstm", h, None, saved, h, None, w_ih, w_hh, True)
    with pytest.raises(RuntimeError, match=r"w_ih must be \(28, I\) and w_hh \(28, 7\)"):
        C.cell_backward("lstm", h, h, saved, h, h, w_ih, torch.randn(28, 6), True)


@requires_cpu_ext
def test_step_kernel_rejects_malformed_parameters_as_forward_does():
    """The one-step kernel (no grad, ≤ 4 rows) checks the module's parameters as the sequence
    kernel does: a (1, G·H) bias was accepted silently, a 1-D weight_hh gave an IndexError
    (found by review)."""
    m = snn.GRU(4, 6)
    m.bias_hh_l0 = torch.nn.Parameter(m.bias_hh_l0.detach()[None])
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=r"b_hh must be \(18,\), got \[1, 18\]"):
            m.step(torch.randn(2, 4))
        with pytest.raises(RuntimeError, match=r"bias_hh must be \(18,\)"):
            m(torch.randn(3, 2, 4))
    m = snn.GRU(4, 6)
    m.weight_hh_l0 = torch.nn.Parameter(m.weight_hh_l0.detach().flatten())
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"w_hh \(18, 6\), got .*\[108\]"):
        m.step(torch.randn(2, 4))


@pytest.mark.parametrize("bad, match, ops_match", [
    ((2, 6), r"weight_hh \[24, 3\] and weight_hr \[2, 6\] disagree on proj_size.*weight_hr \(3, 6\)",
     r"w_hh \(24, 3\) and w_hr \(2, 6\) disagree on proj_size.*w_hr \(3, 6\)"),
    ((3, 5), r"weight_hr must be \(proj_size, 6\), got \[3, 5\]", r"w_hr must be \(proj_size, 6\), got \(3, 5\)"),
    ((18,), r"weight_hr must be \(proj_size, 6\), got \[18\]", r"w_hr must be \(proj_size, 6\), got \(18,\)")])
def test_malformed_weight_hr_is_named(bad, match, ops_match):
    """A wrong-shaped weight_hr was reported as a wrong weight_hh (the kernel takes proj_size
    from weight_hr; found by review)."""
    m = snn.LSTM(4, 6, proj_size=3)
    m.weight_hr_l0 = torch.nn.Parameter(torch.randn(bad))
    x = torch.randn(5, 2, 4)
    with pytest.raises(RuntimeError, match=match):
        m(x)
    with torch.no_grad(), pytest.raises(RuntimeError, match=match):
        m(x)
    with torch.no_grad(), pytest.raises(RuntimeError, match=match):
        m.step(x[0])
    w = dict(w_ih=m.weight_ih_l0, w_hh=m.weight_hh_l0, w_hr=m.weight_hr_l0)
    with pytest.raises(ValueError, match=ops_match):
        ops.recurrent_layer("lstm", x.flatten(0, 1), torch.full((5,), 2), torch.zeros(2, 3),
                            torch.zeros(2, 6), w)


@pytest.mark.parametrize("make", [lambda m: m.RNNCell(3, 4), lambda m: m.RNNCell(3, 4, nonlinearity="relu"),
                                  lambda m: m.LSTMCell(3, 4, bias=False), lambda m: m.GRUCell(3, 4),
                                  lambda m: m.LSTM(3, 4, proj_size=2, bias=False)])
def test_repr_as_torch(make):
    assert repr(make(snn)) == repr(make(torch.nn))


@pytest.mark.parametrize("module", [
    lambda: snn.LSTM(3, 5, num_layers=2, peephole=True), lambda: snn.GRU(3, 5, reset_after=False),
    lambda: snn.RNN(3, 5, nonlinearity="relu", batch_first=True), lambda: snn.LSTM(3, 5, proj_size=2)])
def test_step_streaming_equals_forward(module):
    m = module().double()
    bf = m.batch_first
    x = torch.randn(2, 9, 3, dtype=torch.float64) if bf else torch.randn(9, 2, 3, dtype=torch.float64)
    y, state = m(x)
    st, ys = None, []
    for t in range(9):
        yt, st = m.step(x[:, t] if bf else x[t], st)
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, 1 if bf else 0), y, atol=1e-12, rtol=1e-10)
    for a, b in zip(_flat(st), _flat(state)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_peephole_module_uses_reference_semantics():
    m = snn.LSTM(3, 4, peephole=True).double()
    assert m.weight_peep_l0.shape == (3, 4)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    y, (h, c) = m(x)
    from seqkern.reference import rnn as ref
    w = {"w_ih": m.weight_ih_l0, "w_hh": m.weight_hh_l0, "b_ih": m.bias_ih_l0,
         "b_hh": m.bias_hh_l0, "w_peep": m.weight_peep_l0}
    r, rh, rc = ref.layer("lstm", x, torch.zeros(2, 4, dtype=torch.float64),
                          torch.zeros(2, 4, dtype=torch.float64), **w)
    torch.testing.assert_close(y, r, atol=1e-12, rtol=1e-10)


def test_torch_compile_fullgraph():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = snn.LSTM(4, 8, num_layers=2, batch_first=True)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            y, _ = self.rnn(x)
            return self.head(y[:, -1])

    m = Model()
    x = torch.randn(2, 6, 4)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager, atol=1e-6, rtol=1e-5)
    # eager training runs an autograd.Function, compiled training the custom op's registered
    # backward: both must give the same gradients
    eager.sum().backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    compiled(x).sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-6, rtol=1e-5, msg=n)


def _training_results(fn, x, m, *args):
    """[loss, dx, every parameter's gradient] of fn(x, *args) → a scalar."""
    xx = x.clone().requires_grad_()
    m.zero_grad()
    loss = fn(xx, *args)
    loss.backward()
    return [loss.detach(), xx.grad] + [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("cls", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_torch_compile_fullgraph_with_lengths(cls, batch_first):
    """lengths= compiles whole (the packing is one op with data-dependent output sizes):
    training matches eager, for two sets of lengths, and bad lengths still raise."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = getattr(snn, cls)(5, 6, num_layers=2, bidirectional=True, batch_first=batch_first)
    x = torch.randn(3, 7, 5) if batch_first else torch.randn(7, 3, 5)

    def loss(x, lengths):
        out, h = m(x, lengths=lengths)
        h = h[0] if isinstance(h, tuple) else h
        return out.square().sum() + h.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    for lengths in (torch.tensor([7, 2, 5]), torch.tensor([1, 1, 4])):
        want = _training_results(loss, x, m, lengths)
        got = _training_results(compiled, x, m, lengths)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="lengths must lie in"):
        compiled(x, torch.tensor([8, 2, 5]))


def test_torch_compile_inductor_with_lengths():
    """The same with Inductor, which generates code around the ops' unbacked sizes."""
    torch._dynamo.reset()
    torch.manual_seed(2)
    m = snn.LSTM(5, 6, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(3, 7, 5)

    def loss(x, lengths):
        out, (h, c) = m(x, lengths=lengths)
        return out.square().sum() + h.sum() + c.sum()

    compiled = torch.compile(loss, fullgraph=True)
    lengths = torch.tensor([7, 2, 5])
    want = _training_results(loss, x, m, lengths)
    got = _training_results(compiled, x, m, lengths)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("with_state", [False, True])
def test_torch_compile_fullgraph_with_packed_sequence(cls, enforce_sorted, with_state):
    """A PackedSequence built outside the compiled region (torch's packing itself cannot be
    traced): its batch size is a value of batch_sizes, read by an op when nothing else gives it."""
    torch._dynamo.reset()
    torch.manual_seed(1)
    m = getattr(snn, cls)(5, 6, num_layers=2, bidirectional=True)
    x = torch.randn(7, 3, 5)
    lengths = torch.tensor([7, 5, 2]) if enforce_sorted else torch.tensor([5, 7, 2])
    h = torch.randn(4, 3, 6)
    hx = ((h, torch.randn(4, 3, 6)) if cls == "LSTM" else h) if with_state else None

    def loss(x):
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths,
                                                         enforce_sorted=enforce_sorted)
        return compiled_body(packed) if compiling else body(packed)

    def body(packed):
        out, st = m(packed, hx)
        st = st[0] if isinstance(st, tuple) else st
        return out.data.square().sum() + st.sum()

    compiled_body = torch.compile(body, fullgraph=True, backend="aot_eager")
    compiling = False
    want = _training_results(loss, x, m)
    compiling = True
    got = _training_results(loss, x, m)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_packing_ops_opcheck():
    x = torch.randn(6, 4, 3)
    lengths = torch.tensor([2, 6, 1, 4])
    torch.library.opcheck(ops._pack_by_lengths_op, (x, lengths))
    data, batch_sizes, sorted_idx, unsorted_idx, rows = ops._pack_by_lengths_op(x, lengths)
    want = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    for a, b in zip((data, batch_sizes, sorted_idx, unsorted_idx), want):
        torch.testing.assert_close(a, b)
    torch.library.opcheck(ops._zero_states_op, (batch_sizes, x, 2, 5, 3))
    h, c = ops._zero_states_op(batch_sizes, x, 2, 5, 3)
    assert h.shape == (2, 4, 5) and c.shape == (2, 4, 3) and not h.any() and not c.any()


class TestModuleErrors:
    def test_wrong_rank(self):
        with pytest.raises(ValueError, match="2-D .* or 3-D"):
            snn.LSTM(3, 4)(torch.randn(2, 3, 4, 3))

    def test_wrong_feature_size(self):
        with pytest.raises(ValueError, match="input_size=3"):
            snn.GRU(3, 4)(torch.randn(5, 2, 7))

    def test_h0_wrong_shape(self):
        with pytest.raises(ValueError, match=r"hx must have shape \(1, 2, 4\)"):
            snn.GRU(3, 4)(torch.randn(5, 2, 3), torch.randn(1, 3, 4))

    def test_c0_wrong_shape(self):
        with pytest.raises(ValueError, match=r"c0 must have shape \(2, 2, 4\)"):
            snn.LSTM(3, 4, num_layers=2)(torch.randn(5, 2, 3),
                                          (torch.randn(2, 2, 4), torch.randn(1, 2, 4)))

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match="dtype"):
            snn.LSTM(3, 4)(torch.randn(5, 2, 3, dtype=torch.float64))

    def test_zero_length(self):
        with pytest.raises(ValueError, match="T = 0"):
            snn.RNN(3, 4)(torch.randn(0, 2, 3))

    def test_unsorted_lengths_enforce_sorted(self):
        with pytest.raises(RuntimeError, match="sorted"):
            pack_padded_sequence(torch.randn(4, 2, 3), torch.tensor([2, 4]), enforce_sorted=True)

    def test_lengths_longer_than_T(self):
        with pytest.raises(ValueError, match=r"lengths must lie in \[1, T=4\]"):
            snn.LSTM(3, 4)(torch.randn(4, 2, 3), lengths=torch.tensor([5, 2]))

    def test_bad_constructor(self):
        with pytest.raises(ValueError, match="nonlinearity"):
            snn.RNN(3, 4, nonlinearity="sigmoid")
        with pytest.raises(ValueError, match="proj_size"):
            snn.LSTM(3, 4, proj_size=4)

    def test_step_bidirectional(self):
        with pytest.raises(RuntimeError, match="unidirectional"):
            snn.GRU(3, 4, bidirectional=True).step(torch.randn(2, 3))


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_empty_batch_gives_empty_outputs_as_torch(kind, batch_first):
    t, s = make_pair(kind, 5, 7, num_layers=2, bidirectional=True, batch_first=batch_first)
    x = torch.randn(0, 4, 5, dtype=torch.float64) if batch_first else torch.randn(4, 0, 5, dtype=torch.float64)
    want, got = _flat(t(x)), _flat(s(x))
    assert [a.shape for a in got] == [a.shape for a in want]
    h0 = torch.zeros(4, 0, 7, dtype=torch.float64)
    hx = (h0, h0) if kind == "lstm" else h0
    assert [a.shape for a in _flat(s(x, hx))] == [a.shape for a in _flat(t(x, hx))]
    uni = make_pair(kind, 5, 7)[1]
    assert uni.step(torch.randn(0, 5, dtype=torch.float64))[0].shape == (0, 7)
    # connected to autograd as torch's are: a loss on them back-propagates (zero gradients)
    xg = x.clone().requires_grad_()
    got, want = _flat(s(xg)), _flat(t(xg))
    assert [a.requires_grad for a in got] == [a.requires_grad for a in want] == [True] * len(got)
    sum(a.sum() for a in got).backward()
    assert xg.grad.shape == x.shape and not s.weight_ih_l0.grad.any()


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("bidir", [False, True])
def test_float16_modules_within_torch_error(kind, bidir):
    """float16 runs on the kernels, computed in float32 (as bfloat16 is): outputs, final states
    and gradients (input and parameters) are at most ~2x as far from float64 as torch's own
    float16 module."""
    assert registry.select("rnn", "cpu", torch.float16) == "cpu"
    t, s = make_pair(kind, 5, 7, dtype=torch.float16, num_layers=2, bidirectional=bidir)
    exact = copy.deepcopy(t).double()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, 5, generator=gen)

    def run(m, dtype):
        xi = x.to(dtype).requires_grad_(True)
        outs = _flat(m(xi))
        loss = sum((o.double() * torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view(o.shape)).sum()
                   for o in outs)
        grads = torch.autograd.grad(loss, [xi, *m.parameters()])
        return [o.double() for o in outs] + [g.double() for g in grads]

    want = run(exact, torch.float64)
    for a, b, e in zip(run(s, torch.float16), run(t, torch.float16), want):
        bound = 2 * (b - e).abs().max().item() + 1e-3 * max(1.0, e.abs().max().item())
        assert (a - e).abs().max().item() <= bound


def test_lstm_cell_and_step_bad_state_or_input():
    with pytest.raises(TypeError, match=r"LSTMCell expects hx = \(h, c\), a pair of tensors, got tuple of length 1"):
        snn.LSTMCell(5, 7)(torch.randn(2, 5), (torch.zeros(2, 7),))
    with pytest.raises(ValueError, match=r"x_t must be \(batch, 5\) or \(5,\), got \(2, 6\)"):
        snn.LSTM(5, 7).step(torch.randn(2, 6))
    for x in (torch.ones(2, 5, dtype=torch.long), torch.ones(5, dtype=torch.float64)):
        with pytest.raises(TypeError, match=r"input has dtype/device \(torch\.\w+, cpu\) but the "
                                            r"module's parameters are \(torch.float32, cpu\)"):
            snn.LSTMCell(5, 7)(x)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_step_runs_old_style_weight_norm_hooks():
    lstm = snn.LSTM(4, 5)
    torch.nn.utils.weight_norm(lstm, "weight_hh_l0")
    lstm(torch.randn(6, 3, 4))[0].sum().backward()
    torch.optim.SGD(lstm.parameters(), lr=0.5).step()
    xt, st = torch.randn(3, 4), (torch.randn(1, 3, 5), torch.randn(1, 3, 5))
    with torch.no_grad():
        torch.testing.assert_close(lstm.step(xt, st)[0], lstm(xt[None], st)[0][0])


@pytest.mark.parametrize("make", [lambda: snn.LSTM(3, 4, num_layers=2), lambda: snn.GRU(3, 4),
                                  lambda: snn.LSTMCell(3, 4), lambda: snn.GRUCell(3, 4)])
def test_modules_pickled_before_kind_existed_still_run(make):
    """A module pickled when its lowercase `mode` was seqkern's name (no `kind`) loads and
    runs; layers read torch's `mode` again."""
    import pickle

    m = make()
    old = m.__dict__.copy()
    m.__dict__["mode"] = m.__dict__.pop("kind")  # as the previous version pickled it
    loaded = pickle.loads(pickle.dumps(m))
    m.__dict__.clear()
    m.__dict__.update(old)
    x = torch.randn(2, 3) if "Cell" in type(m).__name__ else torch.randn(5, 2, 3)
    out, new = loaded(x), m(x)
    for a, b in zip(out if isinstance(out, tuple) else (out,), new if isinstance(new, tuple) else (new,)):
        torch.testing.assert_close(a if isinstance(a, torch.Tensor) else a[0],
                                   b if isinstance(b, torch.Tensor) else b[0])
    assert loaded.kind == m.kind
    if "Cell" not in type(m).__name__:
        assert loaded.mode == m.mode == type(m).__name__


def test_mode_is_torchs():
    """`mode` reads as torch.nn.RNNBase's for every kind (code branches on it)."""
    assert snn.RNN(3, 4, nonlinearity="relu").mode == torch.nn.RNN(3, 4, nonlinearity="relu").mode
    assert snn.GRU(3, 4, reset_after=False).mode == "GRU" and snn.GRU(3, 4).kind == "gru"


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_rnnbase_public_helpers_behave_as_torch(kind):
    """check_input / get_expected_hidden_size / check_hidden_size / check_forward_args /
    permute_hidden / _flat_weights as torch.nn.RNNBase has them, for code written against it."""
    kw = dict(num_layers=2, bidirectional=True, batch_first=True)
    if kind == "LSTM":
        kw["proj_size"] = 3
    ours, theirs = getattr(snn, kind)(5, 7, **kw), getattr(torch.nn, kind)(5, 7, **kw)
    assert ours._flat_weights_names == theirs._flat_weights_names
    assert ours._all_weights == theirs._all_weights and ours.mode == theirs.mode
    assert all(a.shape == b.shape for a, b in zip(ours._flat_weights, theirs._flat_weights))
    x = torch.randn(4, 6, 5)
    bsz = torch.tensor([4, 4, 2])
    for bs in (None, bsz):
        xi = x if bs is None else x[0]
        assert ours.get_expected_hidden_size(xi, bs) == theirs.get_expected_hidden_size(xi, bs)
        if kind == "LSTM":
            assert ours.get_expected_cell_size(xi, bs) == theirs.get_expected_cell_size(xi, bs)
    hs = theirs.get_expected_hidden_size(x, None)
    good = (torch.zeros(hs), torch.zeros(4, 4, 7)) if kind == "LSTM" else torch.zeros(hs)
    ours.check_forward_args(x, good, None)
    bad = (torch.zeros(4, 3, 3), good[1]) if kind == "LSTM" else torch.zeros(4, 3, 7)
    for m in (ours, theirs):
        with pytest.raises(RuntimeError, match="Expected hidden"):
            m.check_forward_args(x, bad, None)
        with pytest.raises(RuntimeError, match="input.size\\(-1\\)"):
            m.check_input(torch.randn(4, 6, 3), None)
        with pytest.raises(RuntimeError, match="dimensions"):
            m.check_input(x, bsz)
        with pytest.raises(ValueError, match="dtype"):
            m.check_input(x.double(), None)
    perm = torch.tensor([2, 0, 3, 1])
    got, want = ours.permute_hidden(good, perm), theirs.permute_hidden(good, perm)
    for a, b in zip(got if kind == "LSTM" else [got], want if kind == "LSTM" else [want]):
        assert torch.equal(a, b)
    assert ours.permute_hidden(good, None) is good


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells_reset_parameters(kind):
    cell = getattr(snn, kind)(4, 9)
    torch.manual_seed(3)
    cell.reset_parameters()
    ref = getattr(torch.nn, kind)(4, 9)
    torch.manual_seed(3)
    ref.reset_parameters()
    for (n, a), (m, b) in zip(cell.named_parameters(), ref.named_parameters()):
        assert n == m and torch.equal(a, b)


@pytest.mark.parametrize("kind,kw", [("LSTM", {}), ("LSTM", dict(proj_size=4, batch_first=True)),
                                     ("GRU", dict(num_layers=2, bidirectional=True)),
                                     ("GRU", dict(reset_after=False)), ("RNN", {}),
                                     ("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {})])
def test_autocast_runs_in_its_dtype(kind, kw):
    """Under torch.autocast the module computes exactly as its bfloat16 copy on the input cast
    to bfloat16 (as torch casts its LSTM and RNN), gradients reach the float32 parameters, and
    a bfloat16 input beside float32 weights (an autocast Linear's output) is accepted."""
    import copy

    torch.manual_seed(0)
    m = getattr(snn, kind)(8, 16, **kw)
    x = torch.randn(3, 8) if kind.endswith("Cell") else torch.randn(5, 3, 8)
    first = (lambda y: y[0] if isinstance(y, tuple) else y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = first(m(x))
        assert torch.equal(first(m(x.bfloat16())), y)
    want = first(copy.deepcopy(m).bfloat16()(x.bfloat16()))
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)
    y.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())


def test_autocast_step_and_float64_untouched():
    m = snn.LSTM(8, 16)
    x = torch.randn(4, 2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state, ys = None, []
        for t in range(4):
            y, state = m.step(x[t], state)
            ys.append(y)
        whole, _ = m(x)
    assert ys[-1].dtype == torch.bfloat16
    # the state passed between steps is bfloat16 (c included), so equal up to its rounding
    torch.testing.assert_close(torch.stack(ys).float(), whole.float(), atol=1e-2, rtol=1e-2)
    md = snn.GRU(8, 16).double()  # autocast leaves float64 alone, as torch's does
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert md(x.double())[0].dtype == torch.float64


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_torch_func_grad_and_per_sample_gradients(packed):
    """torch.func transforms (grad, vmap over grad: per-sample gradients, functional_call) work
    as on torch's LSTM: under a transform the reference runs (a custom op's autograd cannot)."""
    torch.manual_seed(0)
    m = snn.LSTM(4, 6, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, 4)
    lengths = torch.tensor([5, 3, 2])

    def loss(params, xx):
        inp = pack_padded_sequence(xx, lengths) if packed else xx
        out = torch.func.functional_call(m, params, (inp,))[0]
        return ((out.data if packed else out) ** 2).sum()

    params = {k: v.detach() for k, v in m.named_parameters()}
    grads = torch.func.grad(loss)(params, x)
    m.zero_grad()
    loss(dict(m.named_parameters()), x).backward()
    for k, p in m.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, atol=1e-5, rtol=1e-5)
    if not packed:
        xs = torch.randn(2, 5, 3, 4)
        per = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xs)
        for i in range(2):
            one = torch.func.grad(loss)(params, xs[i])
            torch.testing.assert_close(per["weight_hh_l1"][i], one["weight_hh_l1"],
                                       atol=1e-5, rtol=1e-5)


def test_hx_as_list_and_namedtuple_under_autocast():
    """torch.nn.LSTM takes hx as any pair (list, namedtuple), with or without autocast."""
    import collections

    State = collections.namedtuple("State", "h c")
    m, t = snn.LSTM(3, 4), torch.nn.LSTM(3, 4)
    t.load_state_dict(m.state_dict())
    x = torch.randn(5, 2, 3)
    h, c = torch.randn(1, 2, 4), torch.randn(1, 2, 4)
    want = t(x, (h, c))[0]
    for hx in ([h, c], State(h, c)):
        torch.testing.assert_close(m(x, hx)[0], want)
        m.step(x[0], hx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert m(x, hx)[0].dtype == torch.bfloat16
    with pytest.raises(TypeError, match="pair of tensors"):
        m(x, [h])


@pytest.mark.parametrize("batch_first", [False, True])
def test_lengths_keyword_under_torch_func(batch_first):
    """lengths= packs with plain tensor ops, so it runs under torch.func transforms and gives
    the gradients plain autograd gives."""
    torch.manual_seed(0)
    m = snn.GRU(3, 4, batch_first=batch_first, bidirectional=True)
    x = torch.randn(3, 5, 3) if batch_first else torch.randn(5, 3, 3)
    lengths = [5, 2, 3]
    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss(p):
        return torch.func.functional_call(m, p, (x,), {"lengths": lengths})[0].pow(2).sum()

    g = torch.func.grad(loss)(params)
    m.zero_grad()
    loss(dict(m.named_parameters())).backward()
    for k, p in m.named_parameters():
        torch.testing.assert_close(g[k], p.grad, atol=1e-5, rtol=1e-5)


def test_lstmcell_half_given_state_raises():
    cell = snn.LSTMCell(3, 4)
    x, c = torch.randn(2, 3), torch.randn(2, 4)
    with pytest.raises(TypeError, match="both tensors"):
        cell(x, (None, c))


def test_batched_gradients_through_the_recurrence():
    """jacobian(vectorize=True) / autograd.grad(is_grads_batched=True) send vmap-batched
    gradients into the backward; they must reach the custom op, not the C++ kernel."""
    from torch.autograd.functional import jacobian

    torch.manual_seed(0)
    gru = snn.GRU(2, 3)
    xs = torch.randn(4, 2, 2)
    f = (lambda a: gru(a)[0])
    torch.testing.assert_close(jacobian(f, xs, vectorize=True), jacobian(f, xs))


def test_dropout_with_one_layer_warns_as_torch():
    with pytest.warns(UserWarning, match="dropout"):
        snn.LSTM(3, 4, dropout=0.5)
    with pytest.warns(UserWarning, match="dropout"):
        torch.nn.LSTM(3, 4, dropout=0.5)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_module_is_clean_after_transforms_and_fake_mode(kind):
    """A call under torch.func.grad/jvp or FakeTensorMode leaves nothing of the transform in the
    module: a later plain call (no_grad, inference_mode), deepcopy and torch.save work. (The
    padded input's batch_sizes were cached on the module, and once held a GradTrackingTensor or
    a FakeTensor.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    m = make_pair(kind, 3, 4)[1]
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        want = copy.deepcopy(m)(x)[0]

    def fake_call(x):
        with FakeTensorMode(allow_non_fake_inputs=True) as fm:
            m(fm.from_tensor(x))

    for transformed in (lambda x: torch.func.grad(lambda x: m(x)[0].sum())(x),
                        lambda x: torch.func.jvp(lambda x: m(x)[0], (x,), (torch.ones_like(x),)),
                        fake_call):
        m.__dict__.pop("_batch_sizes_cache", None)  # as a first call with this shape would
        transformed(x)
        with torch.no_grad():
            torch.testing.assert_close(m(x)[0], want, rtol=0, atol=0)
        with torch.inference_mode():
            torch.testing.assert_close(m(x)[0], want, rtol=0, atol=0)
        m.__dict__.pop("_batch_sizes_cache", None)
        transformed(x)
        torch.save(copy.deepcopy(m), io.BytesIO())


_FAST_CASES = [(kind, cfg) for kind in ("lstm", "gru", "rnn") for cfg in (
    dict(), dict(num_layers=3, bidirectional=True, batch_first=True), dict(bias=False),
    dict(num_layers=2, dropout=0.5), dict(unbatched=True))] + [
    ("lstm", dict(num_layers=2, proj_size=3)), ("rnn", dict(nonlinearity="relu")),
    ("lstm", dict(peephole=True, bidirectional=True)), ("gru", dict(reset_after=False, num_layers=2))]


@pytest.mark.parametrize("kind, cfg", _FAST_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_inference_fast_path_equals_general_path(kind, cfg, dtype):
    """Inference calls with zero initial states take _inference_forward (each layer's kernel
    called directly); its outputs and final states equal the general path's (a grad-enabled
    call) and, where torch has the model, torch's. Training mode with inter-layer dropout and
    inputs the general path must reject do not take it."""
    cfg = dict(cfg)
    unbatched = cfg.pop("unbatched", False)
    native = not (cfg.get("peephole") or cfg.get("reset_after") is False)
    scls = PAIRS[kind][1]
    s = scls(5, 7, **cfg).to(dtype).eval()
    x = torch.randn(6, 5, dtype=dtype) if unbatched else torch.randn(4, 6, 5, dtype=dtype)
    with torch.no_grad():
        assert s._inference_forward(x) is not None
        got = _flat(s(x))
        s.train()
        assert (s._inference_forward(x) is not None) == (s.dropout == 0 or s.num_layers == 1)
        s.eval()
        assert s._inference_forward(torch.randn(4, 6, 3, dtype=dtype)) is None
    general = [a.detach() for a in _flat(s(x))]  # grad enabled: the general path
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-6, rtol=1e-5)
    assert [a.shape for a in got] == [a.shape for a in general]
    for a, b in zip(got, general):
        torch.testing.assert_close(a, b, **tol)
    if native:
        t = PAIRS[kind][0](5, 7, **cfg).to(dtype).eval()
        t.load_state_dict(s.state_dict())
        with torch.no_grad():
            for a, b in zip(got, _flat(t(x))):
                torch.testing.assert_close(a, b, **tol)
    with pytest.raises(ValueError, match="input_size=5"), torch.no_grad():
        s(torch.randn(4, 6, 3, dtype=dtype))


def test_inference_path_on_a_module_pickled_before_it_existed():
    """A module unpickled from an earlier seqkern has no _kernel_arg_names (or the older
    _kernel_args): the inference path builds it rather than failing."""
    t, s = make_pair("lstm", 3, 4, num_layers=2)
    s.__dict__.pop("_kernel_arg_names", None)
    s._kernel_args = [("weight_ih_l0",)]  # what an earlier version may have left
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        assert s._inference_forward(x) is not None
        torch.testing.assert_close(s(x)[0], t(x)[0], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_meta_device_modules_under_no_grad(kind):
    """Meta-device modules give meta outputs of the right shapes with and without grad (the
    inference path once asked autocast about the meta device, which raises); a meta input to a
    cpu module gets the general path's clear error."""
    m = PAIRS[kind][1](5, 7, num_layers=2, bidirectional=True, device="meta")
    x = torch.randn(3, 2, 5, device="meta")
    with torch.no_grad():
        out = _flat(m(x))
    assert [a.shape for a in out] == [a.shape for a in _flat(m(x))]
    assert all(a.device.type == "meta" for a in out)
    with pytest.raises(TypeError, match="dtype/device"), torch.no_grad():
        PAIRS[kind][1](5, 7)(x)


_CELLS = {"lstm": (torch.nn.LSTMCell, snn.LSTMCell), "gru": (torch.nn.GRUCell, snn.GRUCell),
          "rnn": (torch.nn.RNNCell, snn.RNNCell)}
_LAYERS = {"lstm": (torch.nn.LSTM, snn.LSTM), "gru": (torch.nn.GRU, snn.GRU),
           "rnn": (torch.nn.RNN, snn.RNN)}


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("how", ["parametrize", "old_weight_norm", "assigned"])
def test_inference_paths_read_reparametrized_weights(kind, how):
    """The no-grad fast paths (cells, layers' forward, step) read parameters from the module's
    own dict; a weight that a parametrization or an old-style weight_norm hook provides, or one
    assigned afresh, is not a plain entry there and must still be the weight used."""
    torch.manual_seed(0)
    tcell, scell = _CELLS[kind]
    tlayer, slayer = _LAYERS[kind]
    t, s = tcell(6, 5).double(), scell(6, 5).double()
    tl, sl = tlayer(6, 5).double(), slayer(6, 5).double()
    s.load_state_dict(t.state_dict())
    sl.load_state_dict(tl.state_dict())
    for mod, name in ((t, "weight_hh"), (s, "weight_hh"), (tl, "weight_hh_l0"), (sl, "weight_hh_l0")):
        if how == "parametrize":
            torch.nn.utils.parametrize.register_parametrization(mod, name, _Scale())
        elif how == "old_weight_norm":
            torch.nn.utils.weight_norm(mod, name)
            with torch.no_grad():
                getattr(mod, name + "_g").mul_(0.5)
        else:
            setattr(mod, name, torch.nn.Parameter(getattr(mod, name).detach() * 0.5))
    x = torch.randn(3, 6, dtype=torch.float64)
    xs = torch.randn(4, 3, 6, dtype=torch.float64)
    with torch.no_grad():
        for a, b in zip(_flat(t(x)), _flat(s(x))):
            torch.testing.assert_close(b, a)
        for a, b in zip(_flat(tl(xs)), _flat(sl(xs))):
            torch.testing.assert_close(b, a)
        torch.testing.assert_close(sl.step(xs[0])[0], tl(xs[:1])[0][0])


class _Scale(torch.nn.Module):
    def forward(self, w):
        return w * 0.5


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_cells_no_grad_bad_state_errors_as_with_grad(kind):
    """Under no_grad the cells' one-step path must not change what bad input raises."""
    cell = _CELLS[kind][1](4, 3)
    x = torch.randn(2, 4)
    bad_shape = torch.zeros(2, 5)
    bad_dtype = torch.zeros(2, 3, dtype=torch.float64)
    for h, err, match in ((bad_shape, ValueError, r"hx must have shape \(2, 3\), got \(2, 5\)"),
                          (bad_dtype, TypeError, "hx must match the input's dtype")):
        hx = (h, torch.zeros(2, 3)) if kind == "lstm" else h
        for ctx in (torch.enable_grad(), torch.no_grad()):
            with ctx, pytest.raises(err, match=match):
                cell(x, hx)
    with torch.no_grad(), pytest.raises(ValueError, match=r"input must be \(batch, 4\)"):
        cell(torch.randn(2, 5))


@requires_cpu_ext
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_cells_no_grad_follow_the_backend_env_at_run_time(kind, monkeypatch):
    """SEQKERN_BACKEND set while running is honoured on the next call, by the fast paths too."""
    calls = count_calls(monkeypatch, "cell_step")
    cell = _CELLS[kind][1](4, 3)
    x = torch.randn(2, 4)
    with torch.no_grad():
        want = _flat(cell(x))
        assert len(calls) == 1
        monkeypatch.setenv("SEQKERN_BACKEND", "reference")
        for a, b in zip(_flat(cell(x)), want):
            torch.testing.assert_close(a, b)
        assert len(calls) == 1
        monkeypatch.delenv("SEQKERN_BACKEND")
        cell(x)
        assert len(calls) == 2


@requires_cpu_ext
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_cells_no_grad_non_contiguous_inputs(kind):
    torch.manual_seed(1)
    t, s = _CELLS[kind][0](5, 7), _CELLS[kind][1](5, 7)
    s.load_state_dict(t.state_dict())
    x = torch.randn(5, 3).t()
    h = torch.randn(7, 3)[:, ::1].t()
    hx = (h, torch.randn(3, 14)[:, ::2]) if kind == "lstm" else h
    with torch.no_grad():
        for a, b in zip(_flat(t(x, hx)), _flat(s(x, hx))):
            torch.testing.assert_close(b, a, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_step_output_does_not_alias_the_state(kind):
    """With one layer, step()'s output and the new state are equal but separate tensors: a
    caller resetting a finished sequence's state in place keeps the output it already has."""
    m = _LAYERS[kind][1](4, 3)
    with torch.no_grad():
        y, st = m.step(torch.randn(2, 4))
        keep = y.clone()
        for t in _flat(st):
            t[:, 0] = 0
    torch.testing.assert_close(y, keep)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_no_grad_states_can_be_written_with_grad_later(kind):
    """States computed under no_grad (a burn-in) may be written in place with grad enabled,
    e.g. from a learned initial state, as with torch.nn: they must not be no-grad views."""
    m = _LAYERS[kind][1](4, 3)
    learned = torch.nn.Parameter(torch.randn(3))
    with torch.no_grad():
        _, st = m(torch.randn(5, 2, 4))
        _, st2 = m.step(torch.randn(2, 4))
    for state in (st, st2):
        h = _flat(state)[0]
        h[:, 0] = learned
        h.sum().backward()
        assert learned.grad is not None
        learned.grad = None


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_cell_given_biases_after_construction_uses_them(kind):
    """A bias=False cell given biases later uses them, with and without gradients, as torch's."""
    torch.manual_seed(0)
    tcls, scls = _CELLS[kind]
    t, s = tcls(4, 3, bias=False), scls(4, 3, bias=False)
    s.load_state_dict(t.state_dict())
    G = {"lstm": 4, "gru": 3, "rnn": 1}[kind]
    for mod in (t, s):
        torch.manual_seed(1)
        mod.bias_ih = torch.nn.Parameter(torch.randn(G * 3))
        mod.bias_hh = torch.nn.Parameter(torch.randn(G * 3))
    x = torch.randn(2, 4)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            for a, b in zip(_flat(t(x)), _flat(s(x))):
                torch.testing.assert_close(b, a)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("bad", ["w_hh_float64", "b_hh_float64", "w_hh_shape", "b_ih_shape",
                                 "b_ih_2d", "w_hh_meta"])
def test_cell_bad_parameter_errors_same_with_and_without_grad(kind, bad):
    cell = _CELLS[kind][1](4, 3)
    G = {"lstm": 4, "gru": 3, "rnn": 1}[kind]
    name, what = bad.rsplit("_", 1) if bad != "b_ih_2d" else ("b_ih", "2d")
    attr = {"w_hh": "weight_hh", "b_hh": "bias_hh", "b_ih": "bias_ih"}[name]
    old = getattr(cell, attr)
    new = {"float64": lambda: old.detach().double(), "shape": lambda: torch.randn(old.shape[0] + 1, *old.shape[1:]),
           "2d": lambda: torch.randn(G, 3), "meta": lambda: old.detach().to("meta")}[what]()
    setattr(cell, attr, torch.nn.Parameter(new))
    x = torch.randn(2, 4)
    errors = []
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            with pytest.raises(Exception) as e:
                cell(x)
            errors.append((type(e.value), str(e.value)))
    assert errors[0] == errors[1]


@requires_cpu_ext
@pytest.mark.parametrize("kind,kw", [("lstm", {}), ("gru", {}), ("rnn", {"nonlinearity": "relu"}),
                                     ("lstm", {"bias": False, "num_layers": 2}),
                                     ("gru", {"bidirectional": True}), ("lstm", {"proj_size": 3}),
                                     ("gru", {"reset_after": False})])
@pytest.mark.parametrize("B", [1, 3, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("given_state", [False, True])
def test_single_step_forward_matches_torch(kind, kw, B, dtype, given_state, monkeypatch):
    """A forward over one time step without gradients (a streaming call of the layers) runs
    the cells' one-step kernel for ≤ 4 rows: results equal torch's, with zero or given states;
    projections and Cho's GRU take the general loop."""
    torch.manual_seed(0)
    reset_after = kw.pop("reset_after", True)
    if not reset_after:
        t, s = None, snn.GRU(9, 7, reset_after=False).to(dtype)
    else:
        t, s = make_pair(kind, 9, 7, dtype, **kw)
    x = torch.randn(1, B, 9, dtype=dtype)
    D = 2 if s.bidirectional else 1
    L = s.num_layers * D
    Hs = s.proj_size or 7
    hx = None
    if given_state:
        h = torch.randn(L, B, Hs, dtype=dtype)
        hx = (h, torch.randn(L, B, 7, dtype=dtype)) if kind == "lstm" else h
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-6, rtol=1e-5)
    with torch.no_grad():
        got = s(x, hx)
        if t is None:
            with seqkern.use_backend("reference"):
                want = s(x, hx)
        else:
            want = t(x, hx)
    for a, b in zip(_flat(got), _flat(want)):
        torch.testing.assert_close(a, b, **tol)


@requires_cpu_ext
@pytest.mark.parametrize("kind,kw", [("lstm", {"num_layers": 3, "bidirectional": True}),
                                     ("gru", {"num_layers": 2, "batch_first": True}),
                                     ("rnn", {"bidirectional": True, "batch_first": True}),
                                     ("lstm", {"proj_size": 2, "num_layers": 2, "bidirectional": True}),
                                     ("lstm", {"peephole": True}), ("gru", {"reset_after": False})])
@pytest.mark.parametrize("shape", [(1, 1), (6, 1), (4, 3), (17, 5), None], ids=str)
def test_inference_forward_one_call_matches_general_path(kind, kw, shape, monkeypatch):
    """The no-grad forward runs every layer and direction in one C++ call; outputs and states
    equal the general path's (the reference backend) for batched, batch_first and unbatched
    input, projections, peepholes and Cho's GRU, and the output is laid out as torch's."""
    torch.manual_seed(0)
    cls = {"lstm": snn.LSTM, "gru": snn.GRU, "rnn": snn.RNN}[kind]
    kw = dict(kw)
    if kind == "gru" and "reset_after" in kw:
        m = cls(5, 4, reset_after=kw.pop("reset_after"), **kw).double()
    else:
        m = cls(5, 4, **kw).double()
    calls = count_calls(monkeypatch, "recurrent_module_forward")
    if shape is None:
        x = torch.randn(7, 5, dtype=torch.float64)  # unbatched
    else:
        T, B = shape
        x = torch.randn(*((B, T) if m.batch_first else (T, B)), 5, dtype=torch.float64)
    with torch.no_grad():
        got = m(x)
        with seqkern.use_backend("reference"):
            want = m(x)
    assert len(calls) == 1
    for a, b in zip(_flat(got), _flat(want)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_no_grad_output_can_be_written_with_grad_later(kind):
    """As torch's (batch_first=False, batched), the no-grad forward's output is no view, so it
    may be modified in place with grad enabled later."""
    m = _LAYERS[kind][1](4, 3, num_layers=2)
    p = torch.nn.Parameter(torch.randn(3))
    with torch.no_grad():
        out, _ = m(torch.randn(5, 2, 4))
    out.mul_(p)
    out.sum().backward()
    assert p.grad is not None


@requires_cpu_ext
def test_module_forward_entry_rejects_bad_arguments():
    """_C.recurrent_module_forward is only reached through checked modules, but called directly
    with a wrong weight list, input rank or an empty input it raises, naming the problem."""
    m = snn.LSTM(3, 4)
    flat = [m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0, None, None]
    f = seqkern._ext._C.recurrent_module_forward
    with pytest.raises(RuntimeError, match="expected 6 weights for each of 2"):
        f("lstm", torch.randn(5, 2, 3), flat, 2, False, False)
    with pytest.raises(RuntimeError, match="input must be 2-D or 3-D"):
        f("lstm", torch.randn(3), flat, 1, False, False)
    with pytest.raises(RuntimeError, match="empty input"):
        f("lstm", torch.randn(0, 2, 3), flat, 1, False, False)
    with pytest.raises(RuntimeError, match="layer 0 lacks weight_ih or weight_hh"):
        f("lstm", torch.randn(5, 2, 3), [None] + flat[1:], 1, False, False)
    with pytest.raises(RuntimeError, match="weight_ih"):  # the kernel's own shape check
        f("lstm", torch.randn(5, 2, 7), flat, 1, False, False)
    with torch.no_grad():
        out, h, c = f("lstm", torch.randn(5, 2, 3), flat, 1, False, False)
    assert out.shape == (5, 2, 4) and h.shape == (1, 2, 4) and c.shape == (1, 2, 4)


@requires_cpu_ext
@pytest.mark.parametrize("kind,kw", [("lstm", dict(num_layers=2, bidirectional=True)),
                                     ("lstm", dict(proj_size=5, peephole=True)),
                                     ("gru", dict(reset_after=False)),
                                     ("rnn", dict(nonlinearity="relu"))], ids=str)
def test_export_with_dynamic_batch_and_length(kind, kw):
    """torch.export with symbolic batch and length: the graph traced at (3, 6) serves other
    batches and lengths, down to 1, forward and backward (input and weight gradients)."""
    torch.manual_seed(11)
    m = PAIRS[kind][1](7, 9, batch_first=True, **kw).double()
    dims = ({0: torch.export.Dim("b"), 1: torch.export.Dim("t")},)
    ep = torch.export.export(m, (torch.randn(3, 6, 7, dtype=torch.float64),), dynamic_shapes=dims)
    exported = ep.module()
    for b, t in [(1, 1), (2, 3), (5, 17)]:
        x = torch.randn(b, t, 7, dtype=torch.float64, requires_grad=True)
        got, want = exported(x), m(x)
        for a, e in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
            torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10)
        go = torch.randn_like(want[0])
        w_got = [p for n, p in exported.named_parameters() if n.endswith("weight_hh_l0")]
        torch.testing.assert_close(torch.autograd.grad(got[0], [x, *w_got], go),
                                   torch.autograd.grad(want[0], [x, m.weight_hh_l0], go),
                                   atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------- cells in training --------
# A loop of cell calls in training runs each step on _C.cell_step / _C.cell_backward, and the
# steps of a chain (each call's state fed to the next) leave their weight gradients to one
# node that sums them in one product per weight (ops.rnn._StepTape): these check that the
# gradients are torch's whatever the loop and the backward calls look like.

_TRAIN_KINDS = [("lstm", {}), ("gru", {}), ("rnn", {}), ("rnn", {"nonlinearity": "relu"}),
                ("lstm", {"bias": False}), ("gru", {"bias": False})]


def _cell_pair(kind, kw, I, H, dtype):
    t, s = _CELLS[kind][0](I, H, **kw).to(dtype), _CELLS[kind][1](I, H, **kw).to(dtype)
    s.load_state_dict(t.state_dict())
    return t, s


def _cell_loop(cell, kind, x, h0, c0, steps=None):
    """Outputs of cell over x's steps from (h0, c0), and the loss Σ_t h_t · w_t."""
    state = (h0, c0) if kind == "lstm" else h0
    outs = []
    for t in range(steps or x.shape[0]):
        state = cell(x[t], state)
        outs.append(state[0] if kind == "lstm" else state)
    w = torch.linspace(-1, 1, outs[0].numel(), dtype=x.dtype).view(outs[0].shape)
    return outs, sum((o * w * (i + 1)).sum() for i, o in enumerate(outs))


def _leaves(dtype, T, B, I, H, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (B,) if B else ()
    x = torch.randn(T, *shape, I, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    h0 = torch.randn(*shape, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    c0 = torch.randn(*shape, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return x, h0, c0


def _grads_of(cell, leaves):
    return [t.grad for t in leaves] + [p.grad for p in cell.parameters()]


def _train_tol(dtype):
    return dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-4)


@requires_cpu_ext
@pytest.mark.parametrize("kind,kw", _TRAIN_KINDS)
@pytest.mark.parametrize("B", [1, 3, 5, 17, None], ids=["B1", "B3", "B5", "B17", "unbatched"])
@pytest.mark.parametrize("I,H", [(5, 7), (64, 129)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cell_training_loop_matches_torch(kind, kw, B, I, H, dtype, monkeypatch):
    """A training loop over a cell: outputs and the gradients of x, h0, c0 and every parameter
    equal torch's cell, and every step ran on the kernel."""
    t, s = _cell_pair(kind, kw, I, H, dtype)
    calls = count_calls(monkeypatch, "cell_backward")
    want_leaves, got_leaves = _leaves(dtype, 6, B, I, H, 1), _leaves(dtype, 6, B, I, H, 1)
    want_out, want_loss = _cell_loop(t, kind, *want_leaves)
    got_out, got_loss = _cell_loop(s, kind, *got_leaves)
    want_loss.backward()
    got_loss.backward()
    assert len(calls) == 6
    tol = _train_tol(dtype)
    for a, b in zip(got_out, want_out):
        torch.testing.assert_close(a, b, **tol)
    want = _grads_of(t, want_leaves)
    for name, a, b in zip(["x", "h0", "c0"] + [n for n, _ in s.named_parameters()],
                          _grads_of(s, got_leaves), want):
        if b is None:  # (c0 of a cell without one)
            assert a is None, name
            continue
        torch.testing.assert_close(a, b, **tol, msg=name)


@requires_cpu_ext
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_cell_step_op_gradcheck(kind):
    """gradcheck (float64) of three chained ops.cell_step calls, every input and weight."""
    from seqkern.ops import rnn as ops

    g = torch.Generator().manual_seed(3)
    B, I, H = 2, 3, 4
    G = {"lstm": 4, "gru": 3}.get(kind, 1)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
    x, h0, c0 = mk(3, B, I), mk(B, H), mk(B, H)
    w = (mk(G * H, I), mk(G * H, H), mk(G * H), mk(G * H))
    if kind == "rnn_relu":  # keep the pre-activations away from the kink
        with torch.no_grad():
            x.abs_().add_(0.5), h0.abs_(), *(p.abs_().mul_(0.3) for p in w)

    def f(x, h0, c0, *w):
        h, c = h0, c0 if kind == "lstm" else None
        outs = []
        for t in range(3):
            h, c = ops.cell_step(kind, x[t], h, c, w)
            outs.append(h)
        return torch.stack(outs) if kind != "lstm" else (torch.stack(outs), c)

    assert torch.autograd.gradcheck(f, (x, h0, c0, *w))


@requires_cpu_ext
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_cell_training_chain_backward_calls(kind):
    """The chain's weight gradients whatever the backward calls: two losses back-propagated one
    after the other (retain_graph), a gradient of h0 alone first (which stops short of the
    weights), two sequences on the same weights, and a detached (truncated) chain carried into
    a second batch after an optimizer step. Each compared with torch's cell doing the same."""
    dtype = torch.float64
    t, s = _cell_pair(kind, {}, 5, 6, dtype)
    runs = []
    for cell in (t, s):
        cell.zero_grad()
        x, h0, c0 = _leaves(dtype, 8, 3, 5, 6, 2)
        x2, h2, c2 = _leaves(dtype, 8, 3, 5, 6, 4)
        outs, loss = _cell_loop(cell, kind, x, h0, c0)
        res = [torch.autograd.grad(loss, h0, retain_graph=True)[0]]  # stops short of the weights
        outs[2].sum().backward(retain_graph=True)  # steps 0-2 only
        res += [p.grad.clone() for p in cell.parameters()]
        _, loss2 = _cell_loop(cell, kind, x2, h2, c2)  # a second sequence, the same weights
        (loss + loss2).backward()
        res += [p.grad.clone() for p in cell.parameters()] + [x.grad, x2.grad, h2.grad]
        # truncated BPTT: the state detached into the next batch, after an optimizer step
        opt = torch.optim.SGD(cell.parameters(), lr=0.1)
        opt.step()
        opt.zero_grad()
        last = outs[-1].detach()
        _, loss3 = _cell_loop(cell, kind, x2.detach(), last, last.clone())
        loss3.backward()
        res += [p.grad.clone() for p in cell.parameters()]
        runs.append(res)
    for i, (a, b) in enumerate(zip(*[r for r in reversed(runs)])):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=f"item {i}")


@requires_cpu_ext
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_cell_training_frozen_weights_and_batched_grads(kind):
    """Weights that need no gradient (no chain is kept) and gradients asked for in a batch
    (is_grads_batched: the backward's gradients arrive under vmap, where the torch-op form of
    the step's backward runs) equal torch's."""
    dtype = torch.float64
    t, s = _cell_pair(kind, {}, 5, 6, dtype)
    res = []
    for cell in (t, s):
        x, h0, c0 = _leaves(dtype, 4, 2, 5, 6, 5)
        for p in cell.parameters():
            p.requires_grad_(False)
        outs, loss = _cell_loop(cell, kind, x, h0, c0)
        frozen = torch.autograd.grad(loss, (x, h0))
        for p in cell.parameters():
            p.requires_grad_(True)
        outs, _ = _cell_loop(cell, kind, x, h0, c0)
        eye = torch.eye(outs[-1].numel(), dtype=dtype).view(-1, *outs[-1].shape)
        batched = torch.autograd.grad(outs[-1], (h0, cell.weight_hh, cell.weight_ih), eye,
                                      is_grads_batched=True)
        res.append(list(frozen) + list(batched))
    for a, b in zip(*res):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)


@requires_cpu_ext
def test_cell_training_double_backward_raises():
    s = snn.LSTMCell(3, 4).double()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    h, c = s(x)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(h.sum(), x, create_graph=True)


@requires_cpu_ext
@pytest.mark.parametrize("reentrant", [False, True])
def test_cell_training_under_activation_checkpointing(reentrant):
    """torch.utils.checkpoint over a stretch of cell steps (recomputed in the backward, which
    re-runs the steps on the chain's state tensors) gives torch's gradients."""
    from torch.utils.checkpoint import checkpoint

    dtype = torch.float64
    t, s = _cell_pair("lstm", {}, 5, 6, dtype)
    res = []
    for cell in (t, s):
        cell.zero_grad()
        x, h0, c0 = _leaves(dtype, 6, 3, 5, 6, 8)

        def stretch(x3, h, c):
            for i in range(3):
                h, c = cell(x3[i], (h, c))
            return h, c

        h, c = cell(x[0], (h0, c0))
        h, c = checkpoint(stretch, x[1:4], h, c, use_reentrant=reentrant)
        for i in range(4, 6):
            h, c = cell(x[i], (h, c))
        (h.sum() + 2 * c.sum()).backward()
        res.append([x.grad, h0.grad, c0.grad] + [p.grad for p in cell.parameters()])
    for a, b in zip(*res):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)


@requires_cpu_ext
@pytest.mark.parametrize("kind,kw", [("lstm", {"num_layers": 2}), ("gru", {}),
                                     ("rnn", {"num_layers": 3, "nonlinearity": "relu"}),
                                     ("lstm", {"batch_first": True, "bias": False})])
@pytest.mark.parametrize("B", [1, 5, None], ids=["B1", "B5", "unbatched"])
def test_step_training_equals_forward(kind, kw, B, monkeypatch):
    """step() with gradients runs the kernel layer by layer too (each layer's steps a chain, as
    a cell's): T steps give forward()'s outputs and the same gradients of the input, the
    initial state and every parameter."""
    dtype = torch.float64
    t, s = make_pair(kind, 7, 9, dtype, **kw)
    calls = count_calls(monkeypatch, "cell_backward")
    bf = s.batch_first
    g = torch.Generator().manual_seed(9)
    x = torch.randn(*((B,) if B else ()), 6, 7, generator=g, dtype=dtype)
    if not bf and B:
        x = x.transpose(0, 1)
    h0 = torch.randn(s.num_layers, *((B,) if B else ()), 9, generator=g, dtype=dtype)
    hx = (h0, torch.randn_like(h0)) if kind == "lstm" else h0
    res = []
    for run_steps in (False, True):
        s.zero_grad()
        xs = x.clone().requires_grad_()
        st = tuple(a.clone().requires_grad_() for a in _flat(hx))
        st_in = st if kind == "lstm" else st[0]
        if run_steps:
            ys, state = [], st_in
            for i in range(6):
                y_t, state = s.step(xs[:, i] if bf and B else xs[i], state)
                ys.append(y_t)
            y = torch.stack(ys, 1 if bf and B else 0)
        else:
            y, state = s(xs, st_in)
        w = torch.linspace(-1, 1, y.numel(), dtype=dtype).view(y.shape)
        ((y * w).sum() + sum(a.sum() for a in _flat(state))).backward()
        res.append([y, *_flat(state), xs.grad, *(a.grad for a in st)]
                   + [p.grad for p in s.parameters()])
    assert len(calls) == 6 * s.num_layers
    for a, b in zip(*res):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)


@requires_cpu_ext
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_cell_training_chain_threads_and_flags(kind):
    """Backward passes through one kept chain from two threads at once (each pass's entries are
    its own), a weight that starts wanting a gradient mid-chain (a new chain starts), and a
    partial pass (a gradient of x alone) leaving nothing behind on the tape."""
    import threading
    from seqkern.ops import rnn as ops

    dtype = torch.float64
    t, s = _cell_pair(kind, {}, 5, 6, dtype)
    x, h0, c0 = _leaves(dtype, 8, 3, 5, 6, 11)
    want, got = [], []
    for cell, out in ((t, want), (s, got)):
        outs, _ = _cell_loop(cell, kind, x, h0, c0)
        losses = [outs[-1].sum(), (outs[4] ** 2).sum()]
        out.append([torch.autograd.grad(l, [cell.weight_ih, cell.weight_hh], retain_graph=True)
                    for l in losses])
    results, errors = {}, []

    def worker(i):
        try:
            for r in range(10):
                l = got_outs[-1].sum() if i == 0 else (got_outs[4] ** 2).sum()
                results[(i, r)] = torch.autograd.grad(l, [s.weight_ih, s.weight_hh], retain_graph=True)
        except Exception as e:  # (reported below)
            errors.append(e)

    got_outs, _ = _cell_loop(s, kind, x, h0, c0)
    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for (i, r), g in results.items():
        for a, b in zip(g, want[0][i]):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    # partial pass: nothing stays on the tape
    torch.autograd.grad(got_outs[-1].sum(), x, retain_graph=True)
    assert ops.chain_of(got_outs[-1])[0].passes == {}
    # weight_ih frozen for the first step, then wanted: its gradient covers the later steps
    res = []
    for cell in (t, s):
        cell.zero_grad()
        cell.weight_ih.requires_grad_(False)
        state = (h0, c0) if kind == "lstm" else h0
        state = cell(x[0], state)
        cell.weight_ih.requires_grad_(True)
        for i in range(1, 4):
            state = cell(x[i], state)
        (state[0] if kind == "lstm" else state).sum().backward()
        res.append([cell.weight_ih.grad, cell.weight_hh.grad])
    for a, b in zip(*res):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)


@requires_cpu_ext
def test_cell_states_copy_and_save_as_torch(tmp_path):
    """A training cell's state, detached in place or not, deep-copies, pickles and saves (with
    torch.load's weights_only default) as torch's: the chain is not carried in the tensor."""
    import copy
    import pickle

    s = snn.LSTMCell(3, 5)
    h, c = s(torch.randn(2, 3))
    h2, c2 = s(torch.randn(2, 3), (h, c))
    pickle.dumps(h2.detach())
    h2.detach_()
    copy.deepcopy(h2)
    torch.save({"h": h2}, tmp_path / "h.pt")
    torch.testing.assert_close(torch.load(tmp_path / "h.pt")["h"], h2)
    assert not h2.__dict__


@requires_cpu_ext
@pytest.mark.parametrize("kind,kw", [("lstm", {}), ("gru", {}), ("rnn", {}),
                                     ("rnn", {"nonlinearity": "relu"}), ("gru", {"bias": False})])
@pytest.mark.parametrize("B", [1, 5, 17, None], ids=["B1", "B5", "B17", "unbatched"])
def test_cell_bfloat16_loop_as_accurate_as_torch(kind, kw, B):
    """bfloat16 cells (inference and a training loop) on the kernel: against a float64 run of
    the same weights and inputs, outputs and every gradient are within about twice the error
    of torch's own bfloat16 cell (plus a floor of one bf16 rounding of the largest value)."""
    I, H, T = 24, 40, 6
    t, s = _cell_pair(kind, kw, I, H, torch.bfloat16)
    ref = _CELLS[kind][0](I, H, **kw).double()
    ref.load_state_dict(t.state_dict())
    runs = []
    for cell, dtype in ((ref, torch.float64), (t, torch.bfloat16), (s, torch.bfloat16)):
        leaves = [a.detach().to(dtype).requires_grad_() for a in _leaves(torch.bfloat16, T, B, I, H, 12)]
        outs, loss = _cell_loop(cell, kind, *leaves)
        loss.backward()
        with torch.no_grad():
            inf, _ = _cell_loop(cell, kind, *leaves)
        runs.append([torch.stack(outs), torch.stack(inf)] + _grads_of(cell, leaves))
    for i, (r, a, b) in enumerate(zip(*runs)):
        if r is None:
            continue
        r = r.double()
        err_torch, err_ours = max_abs(a.double() - r), max_abs(b.double() - r)
        floor = r.abs().max().item() * 2 ** -8
        assert err_ours <= 2 * err_torch + floor, (i, err_ours, err_torch, floor)


def max_abs(t):
    return t.abs().max().item() if t.numel() else 0.0


@requires_cpu_ext
@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_cell_ops_opcheck(mode, dtype):
    from seqkern.ops import rnn as ops

    g = torch.Generator().manual_seed(13)
    B, I, H = 3, 5, 7
    G = {"lstm": 4, "gru": 3}.get(mode, 1)
    mk = lambda *shape, grad=True: torch.randn(*shape, generator=g).to(dtype).requires_grad_(grad)
    x, h = mk(B, I), mk(B, H)
    c = mk(B, H) if mode == "lstm" else None
    w = (mk(G * H, I), mk(G * H, H), mk(G * H), None)
    torch.library.opcheck(ops._cell_step_op, (mode, x, h, c, *w, True))
    torch.library.opcheck(ops._cell_step_op, (mode, x.detach(), h.detach(),
                                              c.detach() if c is not None else None,
                                              *(t.detach() if t is not None else None for t in w), False))
    with torch.no_grad():
        h_n, c_n, saved = ops._cell_step_op(mode, x, h, c, *w, True)
    lstm = mode == "lstm"
    args = (mode, mk(B, H, grad=False), mk(B, H, grad=False) if lstm else None, saved, h.detach(),
            c.detach() if lstm else None, w[0].detach(), w[1].detach(), True)
    torch.library.opcheck(ops._cell_backward_op, args)


@requires_cpu_ext
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_cell_training_loop_under_compile(kind, monkeypatch):
    """A cell loop under torch.compile (fullgraph) runs the seqkern::cell_step op and gives the
    eager results and gradients."""
    calls = count_calls(monkeypatch, "cell_step")
    torch._dynamo.reset()
    dtype = torch.float64
    _, s = _cell_pair(kind, {}, 5, 6, dtype)
    res = []
    for fn in (lambda *a: _cell_loop(s, kind, *a, steps=4)[1],
               torch.compile(lambda *a: _cell_loop(s, kind, *a, steps=4)[1], backend="aot_eager",
                             fullgraph=True)):
        s.zero_grad()
        x, h0, c0 = _leaves(dtype, 4, 3, 5, 6, 14)
        loss = fn(x, h0, c0)
        loss.backward()
        res.append([loss, x.grad, h0.grad] + [p.grad for p in s.parameters()])
    assert len(calls) == 8  # eager and compiled: 4 steps each
    for a, b in zip(*res):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)


@requires_cpu_ext
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_cell_training_state_reset_in_place(kind, dtype):
    """Resetting a returned state in place between training steps (h.mul_(mask), c[1] = 0:
    sequences ending inside a batch) works, as with torch's LSTMCell and GRUCell: the step keeps
    what its backward needs, not its outputs. Gradients equal torch's cell with the reset done
    out of place."""
    t, s = _cell_pair(kind, {}, 5, 6, dtype)
    res = []
    for cell, in_place in ((t, False), (s, True)):
        cell.zero_grad()
        x, h0, c0 = _leaves(dtype, 5, 3, 5, 6, 15)
        mask = torch.tensor([[1.0], [0.0], [1.0]], dtype=dtype)
        state = (h0, c0) if kind == "lstm" else h0
        outs = []
        for i in range(5):
            state = cell(x[i], state)
            h = state[0] if kind == "lstm" else state
            outs.append(h * 1)
            if i == 2:
                if in_place:
                    h.mul_(mask)
                    if kind == "lstm":
                        state[1][1] = 0
                else:
                    h = h * mask
                    state = (h, state[1] * mask) if kind == "lstm" else h
        sum((o * (j + 1)).sum() for j, o in enumerate(outs)).backward()
        res.append([torch.stack(outs), x.grad, h0.grad] + [p.grad for p in cell.parameters()])
    if dtype == torch.bfloat16:  # (torch's bf16 cell rounds differently: that the reset runs)
        assert all(torch.isfinite(a).all() for a in res[1])
        return
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else _train_tol(dtype)
    for a, b in zip(*res):
        torch.testing.assert_close(b, a, **tol)


@requires_cpu_ext
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_cell_frozen_weights_input_changed_in_place_after_step(kind):
    """With frozen weights a step keeps neither x nor h: changing them in place after the step
    is allowed, as with torch's cells, and gradients are torch's."""
    res = []
    t, s = _cell_pair(kind, {}, 5, 6, torch.float64)
    for cell in (t, s):
        for p in cell.parameters():
            p.requires_grad_(False)
        x, h0, c0 = _leaves(torch.float64, 3, 2, 5, 6, 16)
        xs, hs = x * 1, h0 * 1
        outs, _ = _cell_loop(cell, kind, xs, hs, c0)
        xs.mul_(2)  # (torch's cells allow this: x and h are only needed for weight gradients)
        hs.mul_(2)
        sum(o.sum() for o in outs).backward()
        res.append([h0.grad, c0.grad, x.grad])
    for a, b in zip(*res):
        if a is None:
            assert b is None
            continue
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)


@requires_cpu_ext
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_cell_training_loop_unbatched_compiles_fullgraph(kind):
    """An unbatched cell loop in training compiles into one graph (the chain lookup, which reads
    the states' grad_fn, is eager-only) and matches eager."""
    torch._dynamo.reset()
    _, s = _cell_pair(kind, {}, 5, 6, torch.float64)
    res = []
    for fn in (lambda *a: _cell_loop(s, kind, *a)[1],
               torch.compile(lambda *a: _cell_loop(s, kind, *a)[1], backend="aot_eager",
                             fullgraph=True)):
        s.zero_grad()
        x, h0, c0 = _leaves(torch.float64, 3, None, 5, 6, 17)
        fn(x, h0, c0).backward()
        res.append([x.grad, h0.grad] + [p.grad for p in s.parameters()])
    for a, b in zip(*res):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)


@requires_cpu_ext
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_cell_training_only_biases_want_gradients(kind, dtype):
    """Only the biases trained (the weight matrices frozen): the steps keep neither x nor h, and
    the bias gradients equal torch's."""
    t, s = _cell_pair(kind, {}, 5, 6, dtype)
    res = []
    for cell in (t, s):
        cell.weight_ih.requires_grad_(False)
        cell.weight_hh.requires_grad_(False)
        x, h0, c0 = _leaves(dtype, 4, 3, 5, 6, 18)
        _, loss = _cell_loop(cell, kind, x.detach(), h0.detach(), c0.detach())
        loss.backward()
        res.append([cell.bias_ih.grad, cell.bias_hh.grad])
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=0.1, rtol=0.05)
    for a, b in zip(*res):
        torch.testing.assert_close(b.double(), a.double(), **tol)


def test_lengths_under_fake_tensor_mode():
    """lengths= under FakeTensorMode (and so make_fx's symbolic tracing): the packing goes
    through the op whose fake handles the data-dependent sizes, not through Python reads of
    the lengths."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    m = snn.LSTM(4, 5)
    x, lengths = torch.randn(6, 3, 4), torch.tensor([6, 2, 4])
    with FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True) as mode:
        y, (h, c) = m(mode.from_tensor(x), lengths=mode.from_tensor(lengths))
    assert y.dim() == 3 and y.shape[2] == 5 and h.shape[-1] == c.shape[-1] == 5


@pytest.mark.parametrize("kind", ["GRU", "RNN", "RNN_relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["padded", "packed", "bidirectional", "two_layers"])
def test_output_edited_in_place_before_backward(kind, dtype, layout):
    """y edited in place before backward (Dropout(inplace=True), y[0] = 0), which torch's GRU and
    RNN allow: the backward does not read the output (the RNN cells' y_t comes from the saved
    h_prev and final states), so the gradients are torch's."""
    torch.manual_seed(0)
    name, extra = (kind, {}) if kind != "RNN_relu" else ("RNN", {"nonlinearity": "relu"})
    if layout == "bidirectional":
        extra["bidirectional"] = True
    if layout == "two_layers":
        extra["num_layers"] = 2
    mods = [getattr(lib, name)(5, 17, **extra).to(dtype) for lib in (torch.nn, snn)]
    mods[1].load_state_dict(mods[0].state_dict())
    x = torch.randn(9, 4, 5, dtype=dtype)
    lengths = torch.tensor([9, 7, 7, 2])
    res = []
    for m in mods:
        xi = x.clone().requires_grad_()
        inp = (torch.nn.utils.rnn.pack_padded_sequence(xi, lengths) if layout == "packed" else xi)
        y, h = m(inp)
        y = y.data if layout == "packed" else y
        y.mul_(1.5)
        y[:3] = 0
        (y * torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)).sum().add((h * h).sum()).backward()
        res.append([xi.grad] + [p.grad for p in m.parameters()])
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-9)
    for a, b in zip(*res):
        torch.testing.assert_close(b, a, **tol)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_pickled_torch_module_loads_as_the_seqkern_class(name):
    """A whole-model checkpoint of torch.nn modules, unpickled with torch.nn's classes mapped to
    seqkern's (the migration route for pickled models), loads and gives torch's results. It
    raised AttributeError 'kind' (layers) or failed at the first forward (cells)."""
    import pickle

    class Remap(pickle.Unpickler):
        def find_class(self, module, cls):
            if module == "torch.nn.modules.rnn" and hasattr(snn, cls):
                return getattr(snn, cls)
            return super().find_class(module, cls)

    kw = {} if "Cell" in name else {"num_layers": 2, "bidirectional": True}
    if name.startswith("RNN"):
        kw["nonlinearity"] = "relu"
    if name == "LSTM":
        kw["proj_size"] = 3
    t = getattr(torch.nn, name)(4, 6, **kw)
    s = Remap(io.BytesIO(pickle.dumps(t))).load()
    assert type(s) is getattr(snn, name)
    x = torch.randn(3, 4) if "Cell" in name else torch.randn(5, 3, 4)
    out_s, out_t = s(x), t(x)
    torch.testing.assert_close(out_s[0] if name == "LSTMCell" or "Cell" not in name else out_s,
                               out_t[0] if name == "LSTMCell" or "Cell" not in name else out_t)
    assert s.state_dict().keys() == t.state_dict().keys()
    if "Cell" not in name:
        assert s.mode == t.mode and s._flat_weights_names == t._flat_weights_names


@requires_cpu_ext
@pytest.mark.parametrize("kind,kw", [("lstm", {}), ("gru", {}), ("rnn", {}),
                                     ("rnn", {"nonlinearity": "relu"}), ("lstm", {"bias": False})])
@pytest.mark.parametrize("B", [1, 2, 3, 4, 5, 8, 20])
@pytest.mark.parametrize("I,H", [(5, 7), (300, 33), (64, 129), (520, 513)])
def test_cell_bfloat16_step_is_the_float32_step_rounded(kind, kw, B, I, H):
    """A bfloat16 cell call computes in float32 on its bf16 operands (up to 4 rows the weights
    are read as bf16 by the one-step kernel, to 8 rows, or 32 with I, H ≥ 512, by row products
    over them, past that by bf16 GEMMs; fp32 sums throughout), rounding
    only h' and c': it equals the float32 cell run on the same values, rounded, to within one
    bf16 rounding (the fp32 sums may fall on either side of a rounding boundary)."""
    scls = {"lstm": snn.LSTMCell, "gru": snn.GRUCell, "rnn": snn.RNNCell}[kind]
    s = scls(I, H, **kw).to(torch.bfloat16)
    f = scls(I, H, **kw)
    f.load_state_dict({k: v.float() for k, v in s.state_dict().items()})
    x = torch.randn(B, I).bfloat16()
    hx = torch.randn(B, H).bfloat16()
    hx = (hx, torch.randn(B, H).bfloat16()) if kind == "lstm" else hx
    hx_f = tuple(t.float() for t in hx) if kind == "lstm" else hx.float()
    with torch.no_grad():
        got, want = _flat(s(x, hx)), _flat(f(x.float(), hx_f))
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w.bfloat16().float(), atol=2 ** -8, rtol=2 ** -7)
