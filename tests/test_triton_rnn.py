"""Triton recurrences under the interpreter (TRITON_INTERPRET=1, CPU tensors) against the
reference: outputs, final states and every gradient, packed variable lengths, both directions.

Shapes are tiny on purpose (the interpreter runs each Triton op through numpy) but not
block-aligned: B=3 (< BLOCK_B), H=33 (one full + one partial 32-column block), I=5.
"""
import pytest
import torch

from conftest import triton_interpreter_or_skip

triton_interpreter_or_skip()
from seqkern.triton import rnn as trnn  # noqa: E402

import seqkern  # noqa: E402
from seqkern.ops import rnn as ops  # noqa: E402
from seqkern.reference import rnn as ref  # noqa: E402

pytestmark = pytest.mark.triton
# fp32 throughout; a wrong index or gate gives O(1) errors, roundoff here is ~1e-5 (relu
# lets values grow, so its long weight-gradient sums are the loosest).
TOL = dict(atol=1e-4, rtol=1e-4)


def make_case(mode, lengths, I=5, H=33, proj=None, peep=False, bias=True, scale=0.4):
    G = ref.gate_count(mode)
    Hs = proj or H
    w = {"w_ih": torch.randn(G * H, I) * scale, "w_hh": torch.randn(G * H, Hs) * scale}
    if bias:
        w["b_ih"] = torch.randn(G * H) * scale
        w["b_hh"] = torch.randn(G * H) * scale
    if peep:
        w["w_peep"] = torch.randn(3, H) * scale
    if proj:
        w["w_hr"] = torch.randn(proj, H) * scale
    x = torch.randn(max(lengths), len(lengths), I)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=True)
    h0 = torch.randn(len(lengths), Hs)
    c0 = torch.randn(len(lengths), H) if mode == "lstm" else None
    return packed.data, packed.batch_sizes, h0, c0, w


def run_and_grad(fn, mode, x, batch_sizes, h0, c0, w):
    leaves = [x, h0] + ([c0] if c0 is not None else []) + list(w.values())
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    x_, h0_ = leaves[0], leaves[1]
    c0_ = leaves[2] if c0 is not None else None
    w_ = dict(zip(w.keys(), leaves[3 if c0 is not None else 2:]))
    out, hn, cn = fn(mode, x_, batch_sizes, h0_, c0_, w_)
    # Weighted loss touching every output, so each gradient path is exercised.
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + (hn ** 2).sum()
    if cn is not None:
        loss = loss + (cn * 0.7).sum()
    grads = torch.autograd.grad(loss, leaves)
    return [out, hn] + ([cn] if cn is not None else []) + list(grads)


def check(mode, lengths, reverse=False, **kw):
    case = make_case(mode, lengths, **kw)
    got = run_and_grad(lambda *a: trnn.recurrent_layer(*a, reverse=reverse), mode, *case)
    want = run_and_grad(lambda *a: ops._reference_layer(*a, reverse=reverse), mode, *case)
    names = ["out", "h_n"] + (["c_n"] if mode == "lstm" else []) + ["dx", "dh0"] + \
        (["dc0"] if mode == "lstm" else []) + ["d" + k for k in case[4]]
    for name, g, r in zip(names, got, want):
        torch.testing.assert_close(g, r, **TOL, msg=lambda m: f"{mode} {name}: {m}")


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("mode", ref.MODES)
def test_layer_variable_lengths(mode, reverse):
    check(mode, [4, 3, 1], reverse=reverse)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_lstm_peephole_projection(reverse):
    check("lstm", [4, 2, 2], reverse=reverse, proj=7, peep=True)


def test_single_step_and_no_bias():
    check("gru_cho", [1, 1, 1], bias=False)
    check("lstm", [1], bias=False, peep=True)


@pytest.mark.slow
def test_batch_larger_than_a_tile():
    # 17 rows = one full 16-row program + a second program with one row.
    check("gru", [3] * 9 + [2] * 8, H=17)


def test_public_api_bidirectional_stack_under_triton_backend():
    # ops.recurrence → registry → triton for CPU tensors when forced (interpreter on).
    torch.manual_seed(1)
    mode, B, I, H, L = "lstm", 3, 4, 9, 2
    lengths = torch.tensor([3, 2, 1])
    x = torch.randn(3, B, I)
    data = torch.nn.utils.rnn.pack_padded_sequence(x, lengths).data
    bsz = torch.nn.utils.rnn.pack_padded_sequence(x, lengths).batch_sizes
    weights = []
    for k in range(L * 2):
        inp = I if k < 2 else 2 * H
        weights.append({"w_ih": torch.randn(4 * H, inp) * 0.4, "w_hh": torch.randn(4 * H, H) * 0.4,
                        "b_ih": torch.randn(4 * H) * 0.4, "b_hh": torch.randn(4 * H) * 0.4})
    h0, c0 = torch.randn(L * 2, B, H), torch.randn(L * 2, B, H)
    with seqkern.use_backend("triton"):
        assert seqkern.select("rnn", "cpu") == "triton"
        got = ops.recurrence(mode, data, bsz, h0, c0, weights, num_layers=L, bidirectional=True)
    with seqkern.use_backend("reference"):
        want = ops.recurrence(mode, data, bsz, h0, c0, weights, num_layers=L, bidirectional=True)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, **TOL)


def test_streaming_chunks_equal_whole_sequence():
    # Carrying (h, c) across calls: 5 steps at once == 2 steps then 3 steps.
    x, bsz, h0, c0, w = make_case("lstm", [5, 5], H=10)
    out, hn, cn = trnn.recurrent_layer("lstm", x, bsz, h0, c0, w)
    o1, h1, c1 = trnn.recurrent_layer("lstm", x[:4], bsz[:2], h0, c0, w)
    o2, h2, c2 = trnn.recurrent_layer("lstm", x[4:], bsz[2:], h1, c1, w)
    torch.testing.assert_close(torch.cat([o1, o2]), out, **TOL)
    torch.testing.assert_close(h2, hn, **TOL)
    torch.testing.assert_close(c2, cn, **TOL)


def test_forward_without_grad_saves_nothing():
    x, bsz, h0, c0, w = make_case("gru", [3, 2], H=6)
    res = trnn.recurrent_forward("gru", x, bsz, h0, c0, *[w.get(k) for k in trnn._WEIGHT_KEYS],
                                 False, False)
    assert all(t.numel() == 0 for t in res[3:])
    torch.testing.assert_close(res[0], ops._reference_layer("gru", x, bsz, h0, c0, w, False)[0],
                               **TOL)


def test_float64_runs_on_the_reference():
    # the kernels accumulate in float32; float64 keeps its precision on the reference
    x, bsz, h0, c0, w = make_case("gru", [3, 2], H=6)
    x, h0 = x.double(), h0.double()
    w = {k: t.double() for k, t in w.items()}
    with seqkern.use_backend("triton"):
        assert seqkern.select("rnn", "cpu", torch.float64) == "reference"
        got = ops.recurrent_layer("gru", x, bsz, h0, None, w)
    want = ops._reference_layer("gru", x, bsz, h0, None, w, False)
    for g, r in zip(got, want):
        if g is not None:
            assert torch.equal(g, r)
    with pytest.raises(NotImplementedError, match="float64"):
        trnn.recurrent_layer("gru", x, bsz, h0, None, w)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_float16_within_twice_the_reference_error(mode):
    """float16 storage, fp32 math: outputs and gradients against a float64 reference, at most
    about twice the error of the reference computed in float16 itself."""
    case = make_case(mode, [4, 3, 1], H=9)
    x, bsz, h0, c0, w = case

    def run(dtype, fn):
        cast = (lambda t: None if t is None else t.to(dtype))
        return run_and_grad(fn, mode, cast(x), bsz, cast(h0), cast(c0),
                            {k: cast(t) for k, t in w.items()})

    exact = run(torch.float64, lambda *a: ops._reference_layer(*a, reverse=False))
    half_ref = run(torch.float16, lambda *a: ops._reference_layer(*a, reverse=False))
    got = run(torch.float16, lambda *a: trnn.recurrent_layer(*a, reverse=False))
    assert got[0].dtype == torch.float16
    for i, (a, r, e) in enumerate(zip(got, half_ref, exact)):
        err = lambda u: (u.double() - e.double()).abs().max().item()  # noqa: E731
        assert err(a) <= 2 * err(r) + 1e-3, f"{mode} output/gradient {i}"


@pytest.mark.parametrize("bad", ["sum_short", "sum_long", "increasing", "zero"])
def test_malformed_batch_sizes_raise(bad):
    """The kernels' schedule trusts the packed layout; a wrong one is an error (it read and
    wrote past x and out: garbage rows or heap corruption)."""
    x, bs, h0, c0, w = make_case("lstm", [6, 5, 4])
    bs = {"sum_short": torch.tensor([3, 3, 3, 2, 2, 1]), "sum_long": torch.tensor([3, 3, 3, 3, 3, 3]),
          "increasing": torch.tensor([3, 2, 3, 3, 3, 1]), "zero": torch.tensor([3, 3, 3, 3, 3, 0])}[bad]
    with pytest.raises(ValueError, match="batch_sizes"):
        trnn.recurrent_layer("lstm", x, bs, h0, c0, w)


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh"])
def test_strided_biases(mode):
    """Biases given as strided views (every other element of a longer vector)."""
    x, bs, h0, c0, w = make_case(mode, [4, 3, 1])
    w["b_hh"] = torch.randn(2 * w["b_hh"].numel())[::2]
    w["b_ih"] = torch.randn(2 * w["b_ih"].numel())[::2]
    got = run_and_grad(lambda *a: trnn.recurrent_layer(*a), mode, x, bs, h0, c0, w)
    want = run_and_grad(lambda *a: ops._reference_layer(*a, reverse=False), mode, x, bs, h0, c0, w)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, **TOL)


def test_double_backward_raises():
    x, bs, h0, c0, w = make_case("lstm", [3, 2])
    x.requires_grad_()
    out, _, _ = trnn.recurrent_layer("lstm", x, bs, h0, c0, w)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


@pytest.mark.parametrize("mode", ["rnn_tanh", "gru"])
@pytest.mark.parametrize("reverse", [False, True])
def test_output_edited_in_place_before_backward(mode, reverse):
    """The backward does not read the layer's output (the RNN cells' y_t is rebuilt from the
    saved h_prev and final states), so editing it in place before backward leaves the
    gradients the reference gives."""
    x, batch_sizes, h0, c0, w = make_case(mode, [4, 3, 1])
    res = []
    for fn in (lambda *a: trnn.recurrent_layer(*a, reverse=reverse),
               lambda *a: ops._reference_layer(*a, reverse=reverse)):
        leaves = [t.detach().clone().requires_grad_() for t in [x, h0, *w.values()]]
        out, hn, _ = fn(mode, leaves[0], batch_sizes, leaves[1], None, dict(zip(w, leaves[2:])))
        out.mul_(2)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().add((hn ** 2).sum()).backward()
        res.append([t.grad for t in leaves])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, **TOL)
