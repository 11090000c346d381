"""Triton causal dilated convolutions under the interpreter (TRITON_INTERPRET=1, CPU tensors)
against the reference: grouped and depthwise conv forward + every gradient (incl. the initial
state), dilation larger than L, the fused WaveNet block, and the streaming step."""

import pytest
import torch

from conftest import triton_interpreter_or_skip

triton_interpreter_or_skip()
from seqkern.triton import conv as tconv  # noqa: E402

import seqkern  # noqa: E402
from seqkern.ops import conv as ops  # noqa: E402
from seqkern.reference import conv as ref  # noqa: E402

pytestmark = pytest.mark.triton
TOL = dict(atol=5e-5, rtol=5e-5)


def leaves(*ts):
    return [t.clone().requires_grad_() if t is not None else None for t in ts]


def compare(fn_got, fn_want, inputs):
    got, want = fn_got(*inputs), fn_want(*inputs)
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)
    req = [t for t in inputs if t is not None]
    gs = [torch.randn_like(g) for g in got]
    for i, (a, b) in enumerate(zip(torch.autograd.grad(got, req, gs),
                                   torch.autograd.grad(want[:len(got)], req, gs))):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"grad of input {i}: {m}")


# (C_in, C_out, groups, K, dilation, activation, with initial state)
CONV_CASES = {
    "dense_no_state": (13, 17, 1, 3, 2, None, False),
    "grouped_relu_dilation_gt_L": (12, 18, 3, 2, 40, "relu", True),
    "depthwise_silu_state": (13, 13, 13, 4, 3, "silu", True),
    "dense_tanh_state": (13, 20, 1, 3, 5, "tanh", True),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_causal_conv1d(case):
    C_in, C_out, groups, K, d, act, with_state = CONV_CASES[case]
    B, L = 3, 37
    x, w, b = leaves(torch.randn(B, C_in, L), torch.randn(C_out, C_in // groups, K) * 0.3,
                     torch.randn(C_out))
    st = leaves(torch.randn(B, C_in, (K - 1) * d))[0] if with_state else None
    with seqkern.use_backend("triton"):
        got_fn = lambda x, w, b, st: ops.causal_conv1d(x, w, b, d, groups, act, st)  # noqa: E731
        compare(got_fn, lambda x, w, b, st: ref.causal_conv1d(x, w, b, d, groups, act, st),
                [x, w, b, st])


def test_length_one_and_no_bias():
    x, w = leaves(torch.randn(2, 13, 1), torch.randn(7, 13, 3) * 0.3)
    st = leaves(torch.randn(2, 13, 4))[0]
    compare(lambda x, w, st: tconv.causal_conv1d(x, w, None, 2, 1, None, st),
            lambda x, w, st: ref.causal_conv1d(x, w, None, 2, 1, None, st), [x, w, st])


@pytest.mark.parametrize("with_state", [False, True], ids=["zeros", "state"])
def test_wavenet_block(with_state):
    B, R, G, S, K, d, L = 3, 13, 10, 7, 2, 3, 37
    ins = leaves(torch.randn(B, R, L), torch.randn(2 * G, R, K) * 0.3, torch.randn(2 * G) * 0.1,
                 torch.randn(S, G, 1) * 0.3, torch.randn(S), torch.randn(R, G) * 0.3,
                 None if with_state else torch.randn(R))
    st = leaves(torch.randn(B, R, (K - 1) * d))[0] if with_state else None
    with seqkern.use_backend("triton"):
        compare(lambda *a: ops.wavenet_block(*a[:7], d, a[7]),
                lambda *a: ref.wavenet_block(*a[:7], d, a[7]), ins + [st])


@pytest.mark.parametrize("groups", [1, 13], ids=["dense", "depthwise"])
def test_streaming_step_by_step_equals_whole_sequence(groups):
    # Step kernel once per column with the queue carried == one causal_conv1d over it all;
    # also a 2-chunk split with initial_state (the chunk form of the same state).
    B, C, K, d, L = 2, 13, 3, 4, 11
    x = torch.randn(B, C, L)
    w, b = torch.randn(C, C // groups, K) * 0.3, torch.randn(C)
    whole = ref.causal_conv1d(x, w, b, d, groups, "tanh")
    state = torch.zeros(B, C, (K - 1) * d)
    ys = []
    with torch.no_grad(), seqkern.use_backend("triton"):
        for t in range(L):
            y, state = ops.causal_conv1d_step(x[:, :, t], state, w, b, d, groups, "tanh")
            ys.append(y)
        torch.testing.assert_close(torch.stack(ys, 2), whole, **TOL)
        y1, s1 = ops.causal_conv1d(x[:, :, :4], w, b, d, groups, "tanh", return_final_state=True)
        y2 = ops.causal_conv1d(x[:, :, 4:], w, b, d, groups, "tanh", initial_state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], 2), whole, **TOL)
    torch.testing.assert_close(state, ref.final_state(x, None, (K - 1) * d))


def test_float64_runs_on_the_reference():
    # the kernels accumulate in float32; float64 keeps its precision on the reference
    x, w, b = torch.randn(2, 6, 9).double(), torch.randn(6, 3, 3).double(), torch.randn(6).double()
    with seqkern.use_backend("triton"):
        assert seqkern.select("conv", "cpu", torch.float64) == "reference"
        got = seqkern.ops.causal_conv1d(x, w, b, dilation=2, groups=2, activation="silu")
    assert torch.equal(got, ref.causal_conv1d(x, w, b, dilation=2, groups=2, activation="silu"))
    with pytest.raises(NotImplementedError, match="float64"):
        tconv.causal_conv1d(x, w, b, dilation=2, groups=2)


def test_float16_within_twice_the_reference_error():
    """float16 (fp32 accumulation): output and every gradient against a float64 reference, at
    most about twice the error of the reference computed in float16 itself."""
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 4, 11), torch.randn(6, 2, 3), torch.randn(6)
    g = torch.randn(2, 6, 11)

    def run(dtype, backend):
        leaves = [t.to(dtype).requires_grad_() for t in (x, w, b)]
        with seqkern.use_backend(backend):
            y = seqkern.ops.causal_conv1d(*leaves, dilation=2, groups=2, activation="silu")
        return [y, *torch.autograd.grad(y, leaves, g.to(dtype))]

    exact, half_ref, got = (run(torch.float64, "reference"), run(torch.float16, "reference"),
                            run(torch.float16, "triton"))
    assert got[0].dtype == torch.float16
    for i, (a, r, e) in enumerate(zip(got, half_ref, exact)):
        err = lambda u: (u.double() - e.double()).abs().max().item()  # noqa: E731
        assert err(a) <= 2 * err(r) + 1e-3, f"output/gradient {i}"


@pytest.mark.parametrize("groups", [1, 6], ids=["dense", "depthwise"])
def test_strided_biases(groups):
    """Biases given as strided views: the kernels index vectors without a stride, so the host
    makes them contiguous (a strided bias was read as its first C_out elements)."""
    x, w = leaves(torch.randn(2, 6, 11), torch.randn(6, 6 // groups, 3) * 0.3)
    b = torch.randn(12)[::2].requires_grad_()
    with seqkern.use_backend("triton"):
        compare(lambda x, w, b: ops.causal_conv1d(x, w, b, 2, groups, "silu"),
                lambda x, w, b: ref.causal_conv1d(x, w, b, 2, groups, "silu"), [x, w, b])
        st = torch.randn(2, 6, 4)
        torch.testing.assert_close(ops.causal_conv1d_step(x[:, :, 0], st, w, b, 2, groups)[0],
                                   ref.causal_conv1d_step(x[:, :, 0], st, w, b, 2, groups)[0],
                                   **TOL)
    R, G, S = 4, 3, 5
    xs, cw, sw, rw = leaves(torch.randn(2, R, 9), torch.randn(2 * G, R, 2) * 0.3,
                            torch.randn(S, G) * 0.3, torch.randn(R, G) * 0.3)
    cb, sb, rb = (torch.randn(2 * n)[::2].requires_grad_() for n in (2 * G, S, R))
    with seqkern.use_backend("triton"):
        compare(lambda *a: ops.wavenet_block(*a, dilation=2),
                lambda *a: ref.wavenet_block(*a, dilation=2), [xs, cw, cb, sw, sb, rw, rb])


def test_double_backward_raises():
    x, w = leaves(torch.randn(2, 4, 9), torch.randn(4, 4, 3))
    with seqkern.use_backend("triton"):
        y = ops.causal_conv1d(x, w, None, 2)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


def test_look_back_past_the_kernels_int32_columns_is_refused():
    """The triton kernels index columns in int32: a look-back that the cpu kernels (int64)
    still take, but whose columns overflow there, is an error, not a wrong input gradient."""
    x = torch.randn(1, 2, 5, requires_grad=True)
    w = torch.randn(2, 2, 2)
    with seqkern.use_backend("triton"), pytest.raises(ValueError, match="triton conv kernels"):
        ops.causal_conv1d(x, w, dilation=2**31 - 5)
