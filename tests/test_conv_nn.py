"""Modules: state_dict compatibility with nn.Conv1d, agreement with the same networks written
with torch modules, and streaming (step by step and random chunks) equal to the whole sequence."""
import copy
import random

import pytest
import torch
import torch.nn.functional as F

import seqkern
from seqkern.nn import TCN, CausalConv1d, WaveNet, WaveNetBlock

TOL = dict(rtol=1e-10, atol=1e-10)
BACKENDS = ["cpu", "reference"] if seqkern.availability("cpu")[0] else ["reference"]


def padded_conv(conv: torch.nn.Conv1d, x):
    return conv(F.pad(x, ((conv.kernel_size[0] - 1) * conv.dilation[0], 0)))


def chunks(L, seed):
    rng, out, t = random.Random(seed), [], 0
    while t < L:
        n = rng.randint(1, max(1, L // 4))
        out.append((t, min(L, t + n)))
        t += n
    return out


@pytest.fixture(params=BACKENDS)
def backend(request):
    with seqkern.use_backend(request.param):
        yield request.param


@pytest.mark.parametrize("cin,cout,k,d,groups,bias", [(4, 6, 3, 2, 1, True), (8, 8, 4, 5, 8, False),
                                                       (6, 4, 2, 1, 2, True)])
def test_causal_conv1d_loads_nn_conv1d_state_dict(backend, cin, cout, k, d, groups, bias):
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(cin, cout, k, dilation=d, groups=groups, bias=bias, dtype=torch.float64)
    ours = CausalConv1d(cin, cout, k, dilation=d, groups=groups, bias=bias, dtype=torch.float64)
    ours.load_state_dict(conv.state_dict())
    x = torch.randn(3, cin, 40, dtype=torch.float64)
    torch.testing.assert_close(ours(x), padded_conv(conv, x), **TOL)
    back = torch.nn.Conv1d(cin, cout, k, dilation=d, groups=groups, bias=bias, dtype=torch.float64)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back.weight, conv.weight, rtol=0, atol=0)


def test_causal_conv1d_initialisation_matches_nn_conv1d():
    torch.manual_seed(1)
    a = torch.nn.Conv1d(16, 32, 3)
    torch.manual_seed(1)
    b = CausalConv1d(16, 32, 3)
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)
    torch.testing.assert_close(a.bias, b.bias, rtol=0, atol=0)


@pytest.mark.parametrize("k,d,groups,activation", [(2, 4, 1, None), (3, 2, 6, "silu"), (1, 1, 1, "relu")])
def test_causal_conv1d_streaming(backend, k, d, groups, activation):
    torch.manual_seed(2)
    m = CausalConv1d(6, 6, k, d, groups, activation=activation, dtype=torch.float64)
    x = torch.randn(2, 6, 50, dtype=torch.float64)
    whole, final = m(x, return_state=True)
    state, ys = None, []
    for t in range(50):
        y, state = m.step(x[:, :, t], state)
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, 2), whole, **TOL)
    torch.testing.assert_close(state, final, rtol=0, atol=0)
    state, ys = None, []
    for t0, t1 in chunks(50, k):
        y, state = m(x[:, :, t0:t1], state, return_state=True)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 2), whole, **TOL)


def torch_wavenet_block(block: WaveNetBlock, x):
    """The block written with torch modules (what the benchmark compares against)."""
    conv = torch.nn.Conv1d(block.residual_channels, 2 * block.gate_channels,
                           block.conv.kernel_size, dilation=block.dilation, dtype=x.dtype)
    conv.load_state_dict(block.conv.state_dict())
    h = padded_conv(conv, x)
    G = block.gate_channels
    z = torch.tanh(h[:, :G]) * torch.sigmoid(h[:, G:])
    return x + block.res(z), block.skip(z)


def test_wavenet_block_matches_torch_modules(backend):
    torch.manual_seed(3)
    block = WaveNetBlock(8, 12, 10, kernel_size=3, dilation=4, dtype=torch.float64)
    x = torch.randn(2, 8, 60, dtype=torch.float64, requires_grad=True)
    res, skip = block(x)
    res_t, skip_t = torch_wavenet_block(block, x)
    torch.testing.assert_close(res, res_t, **TOL)
    torch.testing.assert_close(skip, skip_t, **TOL)
    g = torch.autograd.grad((res * 1.5).sum() + (skip ** 2).sum(), [x] + list(block.parameters()))
    g_t = torch.autograd.grad((res_t * 1.5).sum() + (skip_t ** 2).sum(), [x] + list(block.parameters()),
                              allow_unused=True)
    for a, b in zip(g[:1] + g[3:], g_t[:1] + g_t[3:]):   # conv params of the torch copy are separate
        torch.testing.assert_close(a, b, **TOL)


def test_wavenet_structure():
    net = WaveNet(layers=25, residual_channels=4, gate_channels=4, skip_channels=4,
                  kernel_size=2, dilation_cycle=10)
    assert net.dilations == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512] * 2 + [1, 2, 4, 8, 16]
    assert net.receptive_field == 1 + 2 * 1023 + 31
    assert set(net.state_dict()) >= {"blocks.0.conv.weight", "blocks.0.skip.weight", "blocks.24.res.bias"}


def test_wavenet_streaming_and_gradients_agree_across_backends():
    torch.manual_seed(4)
    net = WaveNet(layers=6, residual_channels=4, gate_channels=6, skip_channels=5, kernel_size=2,
                  dilation_cycle=3, dtype=torch.float64)
    x = torch.randn(2, 4, 40, dtype=torch.float64)
    whole, final = net(x, return_state=True)
    # with grad enabled the stack steps block by block; under no_grad it is one fused call
    for grad_mode in (True, False):
        state, ys = None, []
        with torch.set_grad_enabled(grad_mode):
            for t in range(40):
                y, state = net.step(x[:, :, t], state)
                ys.append(y)
        torch.testing.assert_close(torch.stack(ys, 2), whole, **TOL)
        for a, b in zip(state, final):   # deeper layers' queues hold computed residuals
            torch.testing.assert_close(a, b, **TOL)
    state, ys = None, []
    for t0, t1 in chunks(40, 5):
        y, state = net(x[:, :, t0:t1], state, return_state=True)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 2), whole, **TOL)
    grads = {}
    for be in BACKENDS:
        with seqkern.use_backend(be):
            xr = x.clone().requires_grad_()
            out = net(xr)
            params = [xr] + list(net.parameters())
            # the last block's residual output feeds nothing: its grads are None or zeros
            g = torch.autograd.grad((out ** 2).sum(), params, allow_unused=True)
            grads[be] = [torch.zeros_like(p) if d is None else d for p, d in zip(params, g)]
    for a, b in zip(*grads.values()):
        torch.testing.assert_close(a, b, **TOL)


class ChompTCNBlock(torch.nn.Module):
    """Bai et al.'s TemporalBlock as published: symmetric padding then chomping the future."""

    def __init__(self, ours):
        super().__init__()
        self.ours = ours

    def forward(self, x):
        def conv(m, x):
            w, b, d = m.weight, m.bias, m.dilation
            pad = (m.kernel_size - 1) * d
            y = F.conv1d(x, w, b, padding=pad, dilation=d)
            return y[:, :, :-pad] if pad else y
        h = torch.relu(conv(self.ours.conv1, x))
        h = torch.relu(conv(self.ours.conv2, h))
        res = x if self.ours.downsample is None else self.ours.downsample(x)
        return torch.relu(h + res)


def test_tcn_matches_published_block_and_streams(backend):
    torch.manual_seed(6)
    tcn = TCN(3, [8, 8, 5], kernel_size=3, dtype=torch.float64).eval()
    assert [b.conv1.dilation for b in tcn.blocks] == [1, 2, 4]
    assert tcn.receptive_field == 1 + 2 * 2 * (1 + 2 + 4)
    x = torch.randn(2, 3, 45, dtype=torch.float64)
    want = x
    for b in tcn.blocks:
        want = ChompTCNBlock(b)(want)
    whole, final = tcn(x, return_state=True)
    torch.testing.assert_close(whole, want, **TOL)
    state, ys = None, []
    for t in range(45):
        y, state = tcn.step(x[:, :, t], state)
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, 2), whole, **TOL)
    state, ys = None, []
    for t0, t1 in chunks(45, 7):
        y, state = tcn(x[:, :, t0:t1], state, return_state=True)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 2), whole, **TOL)


def test_module_argument_errors():
    with pytest.raises(ValueError, match=r"kernel_size must be a positive int, got 0"):
        CausalConv1d(4, 4, 0)
    with pytest.raises(ValueError, match=r"in_channels \(4\) and out_channels \(6\) must be divisible by groups \(4\)"):
        CausalConv1d(4, 6, 2, groups=4)
    m = CausalConv1d(4, 4, 3, dilation=2)
    with pytest.raises(ValueError, match=r"initial_state must be \(B, C_in, \(K-1\)\*dilation\) = \(1, 4, 4\)"):
        m(torch.randn(1, 4, 10), torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match=r"dilation must be a positive int, got True"):
        CausalConv1d(4, 4, 2, dilation=True)
    with pytest.raises(ValueError, match=r"state must be \(4, 4\) for unbatched input, got \(1, 4, 4\)"):
        m(torch.randn(4, 10), torch.zeros(1, 4, 4))


@pytest.mark.parametrize("L", [1, 2, 7])
def test_unbatched_input_as_conv1d_takes_it(L):
    """(C_in, L) in, (C_out, L) out, as nn.Conv1d; the state unbatched too, and streaming
    through it equals the whole sequence."""
    torch.manual_seed(L)
    m = CausalConv1d(3, 5, 3, dilation=2, activation="tanh", dtype=torch.float64)
    x = torch.randn(3, L + 4, dtype=torch.float64)
    y, state = m(x, return_state=True)
    yb, stateb = m(x[None], return_state=True)
    assert y.shape == (5, L + 4) and state.shape == (3, 4)
    torch.testing.assert_close(y, yb[0], rtol=0, atol=0)
    torch.testing.assert_close(state, stateb[0], rtol=0, atol=0)
    head = m(x[:, :4], return_state=True)[1]
    torch.testing.assert_close(m(x[:, 4:], head), y[:, 4:])


def test_modules_compile_fullgraph(backend):
    torch.manual_seed(9)
    conv = CausalConv1d(8, 8, 3, dilation=2, activation="silu", dtype=torch.float64)
    block = WaveNetBlock(8, 6, 5, kernel_size=2, dilation=4, dtype=torch.float64)
    x = torch.randn(2, 8, 30, dtype=torch.float64, requires_grad=True)
    for mod in (conv, block):
        eager = mod(x)
        compiled = torch.compile(mod, fullgraph=True)(x)
        eager, compiled = (eager,) if isinstance(eager, torch.Tensor) else eager, \
            (compiled,) if isinstance(compiled, torch.Tensor) else compiled
        for e, c in zip(eager, compiled):
            torch.testing.assert_close(c, e, **TOL)
        g_e = torch.autograd.grad(sum(o.sum() for o in eager), x)
        g_c = torch.autograd.grad(sum(o.sum() for o in compiled), x)
        torch.testing.assert_close(g_c[0], g_e[0], **TOL)


def test_chunked_streaming_with_a_reused_input_buffer(backend):
    """An audio loop refills one buffer per chunk: the state a call returns must not be a view
    of its input (it was, and the refill overwrote it before the next chunk read it)."""
    torch.manual_seed(9)
    models = [CausalConv1d(4, 4, 3, 2, dtype=torch.float64),
              WaveNet(3, 4, 6, 5, kernel_size=2, dilation_cycle=2, dtype=torch.float64),
              TCN(4, [4, 4], kernel_size=3, dtype=torch.float64)]
    x = torch.randn(2, 4, 40, dtype=torch.float64)
    for m in models:
        whole = m(x)
        buf, state, ys = torch.empty(2, 4, 10, dtype=torch.float64), None, []
        for i in range(4):
            buf.copy_(x[:, :, 10 * i:10 * (i + 1)])
            out = m(buf, state, return_state=True)
            state = out[-1]
            ys.append(out[0].clone())
        torch.testing.assert_close(torch.cat(ys, 2), whole, **TOL, msg=lambda s: f"{type(m).__name__}: {s}")


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_old_style_weight_norm_and_pruning_hooks_are_honoured():
    """weight_norm / pruning keep `weight` current in a forward pre-hook that only module(...)
    runs; WaveNetBlock runs its convs fused and step() is no __call__, so both run those hooks
    themselves: training several steps works and step() uses the updated weights."""
    torch.manual_seed(4)
    m = WaveNet(2, 4, 4, 4)
    for b in m.blocks:
        torch.nn.utils.weight_norm(b.skip)
        torch.nn.utils.prune.l1_unstructured(b.res, "weight", amount=0.3)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(2, 4, 16)
    for _ in range(3):
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        want = sum(torch_wavenet_block(b, x)[1] for b in m.blocks[:1])
        got = m.blocks[0](x)[1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    c = CausalConv1d(4, 4, 3)
    torch.nn.utils.weight_norm(c)
    c(torch.randn(2, 4, 10)).sum().backward()
    torch.optim.SGD(c.parameters(), lr=0.5).step()
    xs = torch.randn(2, 4, 5)
    with torch.no_grad():
        state, ys = None, []
        for t in range(5):
            y, state = c.step(xs[:, :, t], state)
            ys.append(y)
        torch.testing.assert_close(torch.stack(ys, 2), c(xs), rtol=1e-5, atol=1e-5)


def test_float16_modules_run_on_the_reference():
    """float16 has no conv kernel: the ops and modules compute it on the reference (as the
    recurrent modules do) instead of refusing it."""
    torch.manual_seed(5)
    x = torch.randn(2, 4, 12)
    for m in (CausalConv1d(4, 4, 3, 2), WaveNet(2, 4, 4, 4), TCN(4, [4, 4])):
        half = copy.deepcopy(m).half()
        y = half(x.half())
        assert y.dtype == torch.float16
        torch.testing.assert_close(y.float(), m(x), atol=5e-3, rtol=5e-3)
        with torch.no_grad():
            assert half.step(x[:, :, 0].half())[0].dtype == torch.float16


@pytest.mark.parametrize("make", [lambda: CausalConv1d(4, 6, 3, dilation=2, activation="silu"),
                                  lambda: WaveNetBlock(4, 6, 8, kernel_size=2, dilation=2),
                                  lambda: WaveNet(3, 4, 6, 8, dilation_cycle=3),
                                  lambda: TCN(4, [6, 5], kernel_size=3)])
def test_autocast_runs_in_its_dtype(make):
    """Under torch.autocast (as torch casts conv1d): equal to the module's bfloat16 copy on the
    bfloat16 input, for forward and step; gradients reach the float32 parameters."""
    torch.manual_seed(0)
    m = make()
    x = torch.randn(2, 4, 9)
    first = (lambda y: y[0] if isinstance(y, tuple) else y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = first(m(x))
        s = first(m.step(x[:, :, 0]))
    mb = copy.deepcopy(m).bfloat16()
    assert y.dtype == torch.bfloat16 and torch.equal(y, first(mb(x.bfloat16())))
    assert torch.equal(s, first(mb.step(x[:, :, 0].bfloat16())))
    y.float().square().sum().backward()
    # (a WaveNet's last res conv takes no part: no gradient, see the test above)
    unused = f"blocks.{len(m.blocks) - 1}.res." if isinstance(m, WaveNet) else None
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for n, p in m.named_parameters() if not (unused and n.startswith(unused)))


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_stack_step_rejects_bad_dilations(bad):
    """The fused stack step checks its dilations (dilation 0 read an empty queue in C++)."""
    torch.manual_seed(0)
    net = WaveNet(2, 4, 6, 8, dilation_cycle=2)
    blocks = [b._params() for b in net.blocks]
    x = torch.randn(2, 4)
    states = [torch.zeros(2, 4, 1), torch.zeros(2, 4, 2)]
    with torch.no_grad(), pytest.raises(ValueError, match=r"dilations\[1\]"):
        seqkern.ops.wavenet_stack_step(x, states, blocks, [1, bad])


def test_stack_step_kernel_checks_dilations_itself():
    from seqkern import _ext

    if _ext._C is None:
        pytest.skip("no C++ extension")
    net = WaveNet(1, 4, 6, 8)
    cols = [list(c) for c in zip(*[b._params() for b in net.blocks])]
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"dilations\[0\] must be >= 1"):
        _ext._C.wavenet_stack_step(torch.randn(2, 4), [torch.zeros(2, 4, 0)], *cols, [0])


def test_export_with_dynamic_batch_and_length(backend):
    """torch.export with symbolic batch and length: the graph traced at (3, ·, 20) serves other
    batches and lengths, down to 1, forward and backward."""
    torch.manual_seed(5)
    models = [CausalConv1d(8, 6, 3, dilation=2, dtype=torch.float64),
              CausalConv1d(8, 8, 4, groups=8, activation="silu", dtype=torch.float64),
              WaveNet(3, 8, 6, 5, dtype=torch.float64), TCN(8, [6, 4], dtype=torch.float64)]
    dims = ({0: torch.export.Dim("b"), 2: torch.export.Dim("t")},)
    for m in models:
        ep = torch.export.export(m, (torch.randn(3, 8, 20, dtype=torch.float64),), dynamic_shapes=dims)
        for b, t in [(1, 1), (2, 3), (5, 37)]:
            x = torch.randn(b, 8, t, dtype=torch.float64, requires_grad=True)
            got, want = ep.module()(x), m(x)
            torch.testing.assert_close(got, want, **TOL)
            go = torch.randn_like(want)
            torch.testing.assert_close(torch.autograd.grad(got, x, go)[0],
                                       torch.autograd.grad(want, x, go)[0], **TOL)


def test_wavenet_last_blocks_unused_res_conv_gets_no_gradient():
    """WaveNet drops the last block's residual output: its res conv takes no part in the loss,
    so its parameters get no gradient (None, as in a plain torch stack, and an optimizer's
    weight decay leaves them alone), while every other parameter gets the same gradient as
    with the res conv attached."""
    torch.manual_seed(0)
    wn = WaveNet(3, 4, 5, 3).double()
    x = torch.randn(2, 4, 30, dtype=torch.float64)
    wn(x).pow(2).sum().backward()
    last = wn.blocks[-1].res
    assert last.weight.grad is None and last.bias.grad is None
    assert all(p.grad is not None for n, p in wn.named_parameters() if not n.startswith("blocks.2.res"))
    ref = copy.deepcopy(wn)
    for p in ref.parameters():
        p.grad = None
    skip = None
    h = x
    for b in ref.blocks:  # each block called as a module on its own: res attached everywhere
        h, s = b(h)
        skip = s if skip is None else skip + s
    skip.pow(2).sum().backward()
    for (n, p), q in zip(wn.named_parameters(), ref.parameters()):
        if not n.startswith("blocks.2.res"):
            torch.testing.assert_close(p.grad, q.grad)
    assert not ref.blocks[-1].res.weight.grad.any()


@pytest.mark.parametrize("make", [lambda: CausalConv1d(3, 4, 3, dilation=2),
                                  lambda: WaveNet(2, 3, 4, 5, kernel_size=3, dilation_cycle=2)])
def test_export_with_state_and_a_dynamic_length(make):
    """return_state with a symbolic length: the final state takes no branch on L ≥ P while
    traced, so the exported program serves chunks shorter and longer than the look-back."""
    from torch.export import Dim

    m = make().eval()

    class Chunk(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, x, st):
            return self.m(x, st, return_state=True)

    st = m.initial_state(2)
    x = torch.randn(2, 3, 9)
    first = st if isinstance(st, torch.Tensor) else st[0]
    spec_st = {0: Dim("B")} if isinstance(st, torch.Tensor) else [{0: Dim("B")}] * len(st)
    ep = torch.export.export(Chunk(), (x, st), dynamic_shapes=({0: Dim("B"), 2: Dim("L")}, spec_st))
    assert first.shape[0] == 2
    for L in (1, 3, 7, 12):
        xx = torch.randn(2, 3, L)
        got, want = ep.module()(xx, st), Chunk()(xx, st)
        for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("L", [1, 3, 40])
def test_compiled_state_is_a_compact_copy(L):
    """Compiled with a dynamic length, the returned state is P contiguous columns, as in eager,
    not a view into a copy of the whole chunk."""
    m = CausalConv1d(4, 4, 3, dilation=2).eval()
    x, s0 = torch.randn(2, 4, L), torch.randn(2, 4, 4)
    f = torch.compile(lambda x, s: m(x, s, return_state=True), backend="aot_eager", dynamic=True)
    with torch.no_grad():
        for s in (None, s0):
            (_, want), (_, got) = m(x, s, return_state=True), f(x, s)
            torch.testing.assert_close(got, want, atol=0, rtol=0)
            assert got.is_contiguous() and got.untyped_storage().nbytes() == want.numel() * 4
