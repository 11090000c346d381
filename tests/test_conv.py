"""The C++ causal conv and WaveNet-block kernels against the float64 reference.

Tolerance rule for float32/bfloat16/float16: the kernel's max error against the float64 reference may be
at most twice torch's own error in that dtype (F.conv1d on the left-padded input, autograd for
the gradients) plus a small floor relative to the result's magnitude. float64 must agree to
1e-10 relative.
"""
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seqkern
from seqkern import registry
from seqkern.ops import conv as ops
from seqkern.reference import conv as ref
from conftest import requires_cpu_ext, stable_seed

pytestmark = pytest.mark.skipif(not registry.availability("cpu")[0],
                                reason="the C++ extension is not built")

FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
ACT_FN = {None: lambda y: y, "relu": torch.relu, "silu": F.silu, "tanh": torch.tanh}


def torch_conv(x, w, b, d, groups, activation, state):
    """The same function written with torch's own conv on the explicitly padded input."""
    P = (w.shape[2] - 1) * d
    xp = F.pad(x, (P, 0)) if state is None else torch.cat([state, x], 2)
    return ACT_FN[activation](F.conv1d(xp, w, b, dilation=d, groups=groups))


def run(fn, dtype, tensors, grad_out):
    """fn(*tensors cast to dtype) and the gradients of <fn, grad_out>, all as float64."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.double() * g).sum() for o, g in zip(outs, grad_out))
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, present)
    return [o.detach().double() for o in outs] + [g.double() for g in grads]


def check_against_reference(kernel, torch_fn, ref_fn, tensors, out_shapes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    grad_out = [torch.randn(s, generator=gen, dtype=torch.float64) for s in out_shapes]
    want = run(ref_fn, torch.float64, tensors, grad_out)
    got = run(kernel, dtype, tensors, grad_out)
    theirs = run(torch_fn, dtype, tensors, grad_out) if dtype != torch.float64 else None
    names = [f"output{i}" for i in range(len(out_shapes))] + [
        f"grad{i}" for i in range(len(got) - len(out_shapes))]
    for i, (name, g, w) in enumerate(zip(names, got, want)):
        scale = max(1.0, w.abs().max().item()) if w.numel() else 1.0
        err = (g - w).abs().max().item() if w.numel() else 0.0
        if dtype == torch.float64 or w.numel() == 0:
            bound = 1e-10 * scale
        else:
            bound = 2 * (theirs[i] - w).abs().max().item() + FLOOR[dtype] * scale
        assert err <= bound, f"{name}: error {err:.3g} > allowed {bound:.3g} ({dtype})"


def conv_case(B, Cin, Cout, L, K, d, groups, dtype, activation=None, bias=True, state=False,
              noncontig=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=gen)
    x = torch.randn(B, L, Cin, **f64).transpose(1, 2) if noncontig else torch.randn(B, Cin, L, **f64)
    w = torch.randn(Cout, Cin // groups, K, **f64) / (Cin // groups * K) ** 0.5
    b = torch.randn(Cout, **f64) if bias else None
    s = torch.randn(B, Cin, (K - 1) * d, **f64) if state else None

    def kernel(x, w, b, s):
        if noncontig:
            assert not x.is_contiguous()
        return ops.causal_conv1d(x, w, b, d, groups, activation, s)

    check_against_reference(
        kernel, lambda x, w, b, s: torch_conv(x, w, b, d, groups, activation, s),
        lambda x, w, b, s: ref.causal_conv1d(x, w, b, d, groups, activation, s),
        [x, w, b, s], [(B, Cout, L)], dtype, seed)


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

GRID = [  # B, C_in, C_out, L, K, d, groups
    (1, 1, 1, 1, 1, 1, 1),
    (2, 3, 3, 2, 2, 1, 1),
    (3, 16, 16, 17, 3, 2, 1),
    (2, 64, 64, 1000, 2, 8, 1),
    (2, 130, 64, 1000, 5, 3, 1),
    (1, 64, 130, 17, 7, 1024, 1),         # receptive field ≫ L
    (2, 16, 32, 1000, 4, 64, 4),          # grouped
    (2, 64, 64, 1000, 3, 1, 16),
    (2, 3, 6, 17, 2, 4, 3),               # groups = C_in, channel multiplier 2
    (2, 16, 16, 1000, 4, 1, 16),          # depthwise
    (3, 130, 130, 1000, 7, 5, 130),
    (2, 64, 64, 17, 5, 1024, 64),
    (1, 3, 3, 1, 3, 2, 3),
    (1, 16, 16, 4096, 3, 512, 16),
    (1, 16, 16, 4096, 2, 1, 1),
    (1, 300, 300, 1, 5, 1, 1),            # many channels, few columns: one tile, threaded GEMM
    (1, 256, 64, 2, 5, 3, 2),
    (3, 96, 200, 3, 3, 2, 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Cin,Cout,L,K,d,groups", GRID)
def test_conv_matches_reference(B, Cin, Cout, L, K, d, groups, dtype):
    conv_case(B, Cin, Cout, L, K, d, groups, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_conv_with_many_unfolded_rows(dtype):
    """C_in·K past 16K rows: each thread's unfolded tile is capped at 8 MB, so the tiles are
    narrower than 128 columns. (Not in bf16 against torch: torch 2.13's own bf16 conv1d
    backward corrupts the heap at this shape, `free(): invalid pointer`; see the next test.)"""
    conv_case(1, 4096, 8, 150, 5, 1, 1, dtype)


def test_conv_bf16_with_many_unfolded_rows_equals_its_fp32_computation():
    """The same shape in bf16 (bf16 GEMMs with fp32 sums) against the fp32 kernels on the same
    bf16 values: products of bf16 numbers are exact in fp32, so outputs differ by summation
    order only; the bf16 backward holds dz in bf16, so gradients differ by its rounding."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4096, 150, generator=gen).bfloat16()
    w = (torch.randn(8, 4096, 5, generator=gen) / 150).bfloat16()
    b = torch.randn(8, generator=gen).bfloat16()
    g = torch.randn(1, 8, 150, generator=gen)
    outs = []
    for dt in (torch.bfloat16, torch.float32):
        leaves = [t.to(dt).requires_grad_() for t in (x, w, b)]
        y = ops.causal_conv1d(*leaves, activation="tanh")
        outs.append([y.float()] + [t.float() for t in torch.autograd.grad((y.float() * g).sum(), leaves)])
    for name, a, e in zip(("y", "dx", "dw", "db"), *outs):
        scale = e.abs().max().item()
        assert (a - e).abs().max().item() <= 1e-2 * scale, name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["relu", "silu", "tanh"])
@pytest.mark.parametrize("groups", [1, 2, 16])
def test_conv_activation_state_noncontiguous(activation, groups, dtype):
    conv_case(2, 16, 16, 300, 3, 7, groups, dtype, activation=activation, state=True,
              noncontig=True, seed=groups)


@pytest.mark.parametrize("groups", [1, 4, 64])
def test_conv_without_bias_and_with_state(groups):
    conv_case(2, 64, 64, 200, 4, 16, groups, torch.float32, bias=False, state=True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 3), Cin=st.sampled_from([1, 3, 16, 64, 130]),
       out_mult=st.sampled_from([1, 2]), L=st.sampled_from([1, 2, 17, 1000]),
       K=st.integers(1, 7), d=st.sampled_from([1, 2, 3, 16, 1024]),
       group_kind=st.sampled_from(["dense", "depthwise", "some"]),
       activation=st.sampled_from([None, "relu", "silu", "tanh"]), state=st.booleans(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_conv_random(B, Cin, out_mult, L, K, d, group_kind, activation, state, dtype, seed):
    divisors = [g for g in range(2, Cin) if Cin % g == 0] or [1]
    groups = {"dense": 1, "depthwise": Cin, "some": random.Random(seed).choice(divisors)}[group_kind]
    conv_case(B, Cin, Cin * out_mult, L, K, d, groups, dtype, activation, state=state, seed=seed)


# ---------------------------------------------------------------- WaveNet block ------------

def wavenet_tensors(B, R, G, S, L, K, d, state, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=gen)
    x = torch.randn(B, R, L, **f64)
    cw = torch.randn(2 * G, R, K, **f64) / (R * K) ** 0.5
    sw = torch.randn(S, G, 1, **f64) / G ** 0.5
    rw = torch.randn(R, G, 1, **f64) / G ** 0.5
    cb, sb, rb = ((torch.randn(n, **f64) if bias else None) for n in (2 * G, S, R))
    s = torch.randn(B, R, (K - 1) * d, **f64) if state else None
    return [x, cw, cb, sw, sb, rw, rb, s]


def torch_wavenet(x, cw, cb, sw, sb, rw, rb, s, d):
    G = cw.shape[0] // 2
    h = torch_conv(x, cw, cb, d, 1, None, s)
    z = torch.tanh(h[:, :G]) * torch.sigmoid(h[:, G:])
    return x + F.conv1d(z, rw, rb), F.conv1d(z, sw, sb)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,R,G,S,L,K,d,state", [
    (2, 8, 6, 5, 50, 2, 4, False),
    (1, 16, 32, 24, 1000, 3, 64, True),
    (3, 64, 128, 256, 257, 2, 512, True),
    (1, 3, 1, 1, 1, 1, 1, False),
    (2, 16, 16, 16, 17, 7, 1024, True),
])
def test_wavenet_block_matches_reference(B, R, G, S, L, K, d, state, dtype):
    tensors = wavenet_tensors(B, R, G, S, L, K, d, state)
    check_against_reference(
        lambda *t: ops.wavenet_block(*t[:7], d, t[7]),
        lambda *t: torch_wavenet(*t, d),
        lambda *t: ref.wavenet_block(*t[:7], d, t[7]),
        tensors, [(B, R, L), (B, S, L)], dtype)


def test_wavenet_block_without_biases():
    tensors = wavenet_tensors(2, 8, 4, 6, 40, 2, 8, True, bias=False)
    check_against_reference(
        lambda *t: ops.wavenet_block(*t[:7], 8, t[7]),
        lambda *t: torch_wavenet(*t, 8),
        lambda *t: ref.wavenet_block(*t[:7], 8, t[7]),
        tensors, [(2, 8, 40), (2, 6, 40)], torch.float32)


def test_wavenet_block_skip_only_loss():
    x, cw, cb, sw, sb, rw, rb, _ = wavenet_tensors(2, 8, 4, 6, 40, 2, 2, False)
    leaves = [t.clone().requires_grad_() for t in (x, cw, sw)]
    _, skip = ops.wavenet_block(leaves[0], leaves[1], cb, leaves[2], sb, rw, rb, 2)
    skip.sum().backward()
    ref_leaves = [t.clone().requires_grad_() for t in (x, cw, sw)]
    _, skip_r = ref.wavenet_block(ref_leaves[0], ref_leaves[1], cb, ref_leaves[2], sb, rw, rb, 2)
    skip_r.sum().backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- gradcheck / opcheck ------

@pytest.mark.parametrize("Cin,Cout,groups,activation", [
    (4, 6, 1, None), (4, 6, 2, "tanh"), (5, 5, 5, "silu"), (3, 3, 3, None), (4, 4, 1, "silu"),
])
def test_conv_gradcheck(Cin, Cout, groups, activation):
    gen = torch.Generator().manual_seed(5)
    f64 = dict(dtype=torch.float64, generator=gen)
    K, d, L = 3, 2, 9
    x = torch.randn(2, Cin, L, **f64).requires_grad_()
    w = torch.randn(Cout, Cin // groups, K, **f64).requires_grad_()
    b = torch.randn(Cout, **f64).requires_grad_()
    s = torch.randn(2, Cin, (K - 1) * d, **f64).requires_grad_()
    fn = lambda x, w, b, s: ops.causal_conv1d(x, w, b, d, groups, activation, s, True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b, s))


def test_wavenet_gradcheck():
    tensors = [t.requires_grad_() for t in wavenet_tensors(2, 3, 2, 4, 7, 2, 3, True, seed=6)]
    assert torch.autograd.gradcheck(lambda *t: ops.wavenet_block(*t[:7], 3, t[7], True), tensors)


def _opcheck(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("groups,activation", [(1, 0), (2, 1), (4, 2), (4, 3)])
def test_opcheck_conv(groups, activation, dtype):
    x = torch.randn(2, 4, 11, dtype=dtype, requires_grad=True)
    w = torch.randn(6 if groups != 4 else 4, 4 // groups, 3, dtype=dtype, requires_grad=True)
    b = torch.randn(w.shape[0], dtype=dtype, requires_grad=True)
    s = torch.randn(2, 4, 4, dtype=dtype, requires_grad=True)
    _opcheck(ops._conv_op, (x, w, b, s, 2, groups, activation, True))
    _opcheck(ops._conv_op, (x.detach(), w.detach(), None, None, 2, groups, activation, False))
    y, pre = ops._conv_op(x.detach(), w.detach(), b.detach(), s.detach(), 2, groups, activation,
                          True)
    _opcheck(ops._conv_backward_op, (torch.randn_like(y), x.detach(), w.detach(), s.detach(), y,
                                     pre, 2, groups, activation, True))


def test_opcheck_wavenet():
    x, cw, cb, sw, sb, rw, rb, s = [t.float() for t in wavenet_tensors(2, 4, 3, 5, 13, 2, 3, True)]
    sw, rw = sw[:, :, 0], rw[:, :, 0]
    req = [t.clone().requires_grad_() for t in (x, cw, cb, sw, sb, rw, rb, s)]
    _opcheck(ops._wavenet_op, (*req, 3, True))
    _opcheck(ops._wavenet_op, (x, cw, None, sw, None, rw, None, None, 3, False))
    res, skip, h = ops._wavenet_op(x, cw, cb, sw, sb, rw, rb, s, 3, True)
    _opcheck(ops._wavenet_backward_op, (torch.randn_like(res), torch.randn_like(skip), x, cw, cb,
                                        sw, rw, s, h, 3, True, True))


def test_opcheck_wavenet_stack_step():
    layers = [wavenet_tensors(2, 4, 3, 5, 1, K, d, False, seed=K + d) for K, d in ((2, 1), (3, 2), (1, 1))]
    x_t = layers[0][0][:, :, 0].float()
    states = [torch.randn(2, 4, (K - 1) * d) for K, d in ((2, 1), (3, 2), (1, 1))]
    cw, cb, sw, sb, rw, rb = ([l[i].float() if l[i] is not None else None for l in layers] for i in range(1, 7))
    sw = [w[:, :, 0] for w in sw]
    rw = [w[:, :, 0] for w in rw]
    _opcheck(ops._wavenet_stack_step_op, (x_t, states, cw, cb, sw, sb, rw, rb, [1, 2, 1]))


def test_double_backward_raises():
    x = torch.randn(1, 2, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 2, dtype=torch.float64, requires_grad=True)
    y = ops.causal_conv1d(x, w)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(y.sum(), x, create_graph=True)
    tensors = [t.requires_grad_() for t in wavenet_tensors(1, 2, 2, 2, 5, 2, 1, False)[:7]]
    res, skip = ops.wavenet_block(*tensors, 1)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(res.sum() + skip.sum(), tensors[0], create_graph=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["expanded_scalar", "expanded_row", "transposed", "sliced"])
@pytest.mark.parametrize("C,L,K,d", [(16, 37, 3, 2), (5, 1000, 4, 1), (3, 7, 2, 16)])
def test_depthwise_backward_reads_strided_gradients(layout, C, L, K, d, dtype):
    """The depthwise backward reads a non-contiguous grad_output in place (y.sum()'s gradient
    is stride 0 everywhere); it must give what the same gradient made contiguous gives."""
    B = 3
    gen = torch.Generator().manual_seed(stable_seed(layout, C, L))
    x = torch.randn(B, C, L, generator=gen, dtype=dtype)
    w = torch.randn(C, 1, K, generator=gen, dtype=dtype)
    b = torch.randn(C, generator=gen, dtype=dtype)
    g = {"expanded_scalar": lambda: torch.tensor(0.7, dtype=dtype).expand(B, C, L),
         "expanded_row": lambda: torch.randn(B, C, 1, generator=gen, dtype=dtype).expand(B, C, L),
         "transposed": lambda: torch.randn(B, L, C, generator=gen, dtype=dtype).transpose(1, 2),
         "sliced": lambda: torch.randn(B, 2 * C, L + 3, generator=gen, dtype=dtype)[:, ::2, 1:L + 1],
         }[layout]()
    assert not g.is_contiguous()

    def grads(grad):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y = ops.causal_conv1d(*leaves, dilation=d, groups=C)
        return torch.autograd.grad(y, leaves, grad)

    got, want = grads(g), grads(g.contiguous())
    for name, a, e in zip(("dx", "dweight", "dbias"), got, want):
        torch.testing.assert_close(a, e, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                   atol=1e-5 if dtype == torch.float32 else 1e-12, msg=name)


@requires_cpu_ext
def test_bf16_results_keep_subnormals_and_specials():
    """The kernels compute bf16 in float32 and round their results back with their own
    vector conversion (vcvtne2ps2bf16 where the CPU has it, which reads subnormals as zero):
    an identity convolution must return every bf16 value bit for bit, subnormals, ±0, the
    largest finite value, ±inf and NaN included, forward and backward, also past one vector
    and in a tail."""
    vals = [1e-39, -3e-39, 9.2e-41, 1.1754944e-38, 2e-38, 0.0, 3.3895e38, float("inf"),
            float("-inf"), float("nan"), 1.0, -2.5]
    x = torch.tensor(vals * 7, dtype=torch.float32).bfloat16().view(1, 1, -1)
    w = torch.ones(1, 1, 1, dtype=torch.bfloat16)
    y = ops.causal_conv1d(x, w)
    assert torch.equal(y.view(torch.int16), x.view(torch.int16))
    xg = torch.ones_like(x, requires_grad=True)
    ops.causal_conv1d(xg, w).backward(x)
    assert torch.equal(xg.grad.view(torch.int16), x.view(torch.int16))


def test_large_output_blocks_are_cached_and_reused():
    """Large outputs come from a block cache; a reused block must not leak the old
    contents into a new result, and the cache can be emptied."""
    from seqkern import _ext

    C, L = 64, 40000  # 10 MB per output
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(C, 1, 3, generator=gen)
    x1, x2 = torch.randn(2, C, L, generator=gen), torch.randn(2, C, L, generator=gen)
    _ext._C.alloc_release_cache()
    y1 = ops.causal_conv1d(x1, w, groups=C)
    expected1 = ref.depthwise_causal_conv1d(x1, w, None, 1)
    torch.testing.assert_close(y1, expected1, rtol=1e-5, atol=1e-5)
    del y1
    assert _ext._C.alloc_cached_bytes() >= x1.numel() * 4
    y2 = ops.causal_conv1d(x2, w, groups=C)  # reuses the block y1 had
    assert _ext._C.alloc_cached_bytes() == 0
    torch.testing.assert_close(y2, ref.depthwise_causal_conv1d(x2, w, None, 1), rtol=1e-5, atol=1e-5)
    del y2
    _ext._C.alloc_release_cache()
    assert _ext._C.alloc_cached_bytes() == 0


def test_block_cache_serves_nearby_sizes_from_one_block():
    """A variable-length workload asks for a slightly different size each call: a freed block
    serves requests down to 4/5 of its size, so the cache holds one block, not one per size."""
    from seqkern import _ext

    C = 64
    w = torch.randn(C, 1, 3)
    _ext._C.alloc_release_cache()
    for L in range(40000, 32000, -500):  # 20.5 MB down to 16.6 MB outputs
        x = torch.randn(2, C, L)
        y = ops.causal_conv1d(x, w, groups=C)
        torch.testing.assert_close(y, ref.depthwise_causal_conv1d(x, w, None, 1), rtol=1e-5,
                                   atol=1e-5)
        del y
        assert _ext._C.alloc_cached_bytes() <= 2 * C * 40000 * 4 + (4 << 20)
    _ext._C.alloc_release_cache()


@requires_cpu_ext
def test_fork_while_another_thread_holds_the_block_cache():
    """A process forked while another thread holds the large-block cache's lock (a DataLoader
    or multiprocessing worker forked during a seqkern call elsewhere): the child's own use of
    the cache must not wait forever for a lock no thread of it will release."""
    import os
    import threading
    import time

    from seqkern import _ext

    holder = threading.Thread(target=_ext._C._alloc_hold_lock, args=(0.5,))
    holder.start()
    time.sleep(0.1)  # the lock is held now
    pid = os.fork()
    if pid == 0:  # child: free and take blocks, then leave without running pytest's teardown
        try:
            _ext._C.alloc_release_cache()
            torch.set_num_threads(1)
            ops.causal_conv1d(torch.randn(1, 8, 40000), torch.randn(8, 1, 2), groups=8)
        finally:
            os._exit(0)
    holder.join()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung on the block cache's lock")


# ---------------------------------------------------------------- streaming ---------------

def _chunks(L, rng):
    cuts, t = [], 0
    while t < L:
        n = rng.randint(1, max(1, L // 3))
        cuts.append((t, min(L, t + n)))
        t += n
    return cuts


@pytest.mark.parametrize("K,d,groups,activation", [(2, 1, 1, None), (3, 4, 2, "silu"),
                                                   (4, 16, 8, "relu"), (1, 1, 1, "tanh"),
                                                   (5, 3, 1, "tanh")])
def test_conv_streaming_equals_whole_sequence(K, d, groups, activation):
    torch.manual_seed(7)
    B, C, L = 2, 8, 97
    x = torch.randn(B, C, L, dtype=torch.float64)
    w = torch.randn(C, C // groups, K, dtype=torch.float64)
    b = torch.randn(C, dtype=torch.float64)
    whole, final = ops.causal_conv1d(x, w, b, d, groups, activation, return_final_state=True)
    P = (K - 1) * d
    state = torch.zeros(B, C, P, dtype=torch.float64)
    steps = []
    for t in range(L):
        y, state = ops.causal_conv1d_step(x[:, :, t], state, w, b, d, groups, activation)
        steps.append(y)
    torch.testing.assert_close(torch.stack(steps, 2), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, final, rtol=0, atol=0)
    rng = random.Random(K * 100 + d)
    for _ in range(3):
        state, outs = None, []
        for t0, t1 in _chunks(L, rng):
            y, state = ops.causal_conv1d(x[:, :, t0:t1], w, b, d, groups, activation, state, True)
            outs.append(y)
        torch.testing.assert_close(torch.cat(outs, 2), whole, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state, final, rtol=0, atol=0)


def test_chunked_gradients_flow_through_the_state():
    torch.manual_seed(8)
    x = torch.randn(2, 4, 30, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 4, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 4, 30, dtype=torch.float64)
    y1, s = ops.causal_conv1d(x[:, :, :4], w, dilation=5, return_final_state=True)
    y2 = ops.causal_conv1d(x[:, :, 4:], w, dilation=5, initial_state=s)
    dx, dw = torch.autograd.grad((torch.cat([y1, y2], 2) * g).sum(), (x, w))
    dx_r, dw_r = torch.autograd.grad((ref.causal_conv1d(x, w, dilation=5) * g).sum(), (x, w))
    torch.testing.assert_close(dx, dx_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dw, dw_r, rtol=1e-10, atol=1e-10)


def test_wavenet_block_streaming_equals_whole_sequence():
    x, cw, cb, sw, sb, rw, rb, _ = wavenet_tensors(2, 8, 4, 6, 45, 3, 4, False, seed=9)
    res, skip, final = ops.wavenet_block(x, cw, cb, sw, sb, rw, rb, 4, None, True)
    state = torch.zeros(2, 8, 8, dtype=torch.float64)
    r_steps, s_steps = [], []
    for t in range(45):
        r, s, state = ops.wavenet_block_step(x[:, :, t], state, cw, cb, sw, sb, rw, rb, 4)
        r_steps.append(r)
        s_steps.append(s)
    torch.testing.assert_close(torch.stack(r_steps, 2), res, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.stack(s_steps, 2), skip, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, final, rtol=0, atol=0)
    state, rs, ss = None, [], []
    for t0, t1 in _chunks(45, random.Random(3)):
        r, s, state = ops.wavenet_block(x[:, :, t0:t1], cw, cb, sw, sb, rw, rb, 4, state, True)
        rs.append(r)
        ss.append(s)
    torch.testing.assert_close(torch.cat(rs, 2), res, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat(ss, 2), skip, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- backends / errors -------

def test_backend_selection():
    assert "cpu" in registry.implemented("conv")
    assert registry.select("conv", "cpu") == "cpu"
    x = torch.randn(1, 4, 10, dtype=torch.float64)
    w = torch.randn(4, 4, 2, dtype=torch.float64)
    with seqkern.use_backend("reference"):
        y_ref = ops.causal_conv1d(x, w, dilation=3, activation="tanh")
    torch.testing.assert_close(ops.causal_conv1d(x, w, dilation=3, activation="tanh"), y_ref,
                               rtol=1e-12, atol=1e-12)


def _args(x=(2, 4, 7), w=(4, 4, 2), bias=None, dilation=1, groups=1, activation=None,
          state=None, x_dtype=torch.float32, w_dtype=torch.float32, state_dtype=torch.float32):
    return (torch.randn(*x).to(x_dtype), torch.randn(*w, dtype=w_dtype),
            None if bias is None else torch.randn(*bias), dilation, groups, activation,
            None if state is None else torch.randn(*state, dtype=state_dtype))


BAD = [
    (dict(w=(4, 3, 2)), ValueError, r"weight.shape\[1\] must be in_channels / groups = 4 / 1 = 4, got 3"),
    (dict(groups=3, w=(3, 1, 2)), ValueError, r"in_channels \(4, x.shape\[1\]\) is not divisible by groups \(3\)"),
    (dict(w=(5, 2, 2), groups=2), ValueError, r"out_channels \(5, weight.shape\[0\]\) is not divisible by groups \(2\)"),
    (dict(w=(4, 4, 0)), ValueError, r"kernel size \(weight.shape\[2\]\) must be >= 1, got 0"),
    (dict(dilation=0), ValueError, r"dilation must be an integer >= 1, got 0"),
    (dict(dilation=True), ValueError, r"dilation must be an integer >= 1, got True"),
    (dict(state=(2, 4, 3)), ValueError, r"initial_state must be \(B, C_in, \(K-1\)\*dilation\) = \(2, 4, 1\), got \(2, 4, 3\)"),
    (dict(w_dtype=torch.float64), TypeError, r"weight has dtype torch.float64 but x has dtype torch.float32"),
    (dict(state=(2, 4, 1), state_dtype=torch.float64), TypeError, r"initial_state has dtype torch.float64 but x has dtype torch.float32"),
    (dict(bias=(3,)), ValueError, r"bias must have shape \(4,\), got \(3,\)"),
    (dict(activation="gelu"), ValueError, r"activation must be None, 'none', 'relu', 'silu' or 'tanh', got 'gelu'"),
    (dict(x=(2, 4)), ValueError, r"x must be a \(B, C, L\) tensor, got shape \(2, 4\)"),
    (dict(x_dtype=torch.float64, w_dtype=torch.float64, state=(2, 4, 1)), TypeError, r"initial_state has dtype torch.float32 but x has dtype torch.float64"),
    (dict(x_dtype=torch.int32), TypeError, r"x must be a floating-point tensor, got torch.int32"),
    (dict(dilation=2**62), ValueError, r"\(kernel_size - 1\) \* dilation = \(2 - 1\) \* 4611686018427387904 .* exceeds"),
]


@pytest.mark.parametrize("kw,exc,match", BAD)
def test_bad_input_raises_clear_error(kw, exc, match):
    with pytest.raises(exc, match=match):
        ops.causal_conv1d(*_args(**kw))


def test_device_mismatch_raises():
    x, w = torch.randn(1, 2, 5), torch.randn(2, 2, 2, device="meta")
    with pytest.raises(ValueError, match=r"weight is on meta but x is on cpu; they must match"):
        ops.causal_conv1d(x, w)


def test_bad_wavenet_and_step_inputs():
    x, cw, cb, sw, sb, rw, rb, _ = [t.float() if t is not None else None
                                    for t in wavenet_tensors(1, 4, 3, 5, 9, 2, 1, False)]
    with pytest.raises(ValueError, match=r"conv_weight must have 2\*gate_channels output channels"):
        ops.wavenet_block(x, cw[:5], cb[:5], sw, sb, rw, rb)
    with pytest.raises(ValueError, match=r"res_weight must have residual_channels = 4 rows"):
        ops.wavenet_block(x, cw, cb, sw, sb, rw[:3], rb[:3])
    with pytest.raises(ValueError, match=r"skip_weight must be \(out, gate_channels=3\)"):
        ops.wavenet_block(x, cw, cb, sw[:, :2], sb, rw, rb)
    with pytest.raises(ValueError, match=r"state must be \(B, C_in, \(K-1\)\*dilation\) = \(1, 4, 4\), got \(1, 4, 3\)"):
        ops.causal_conv1d_step(x[:, :, 0], torch.zeros(1, 4, 3), cw, cb, dilation=4)
    xt, st = x[:, :, 0], torch.zeros(1, 4, 1)
    step_errors = [
        (dict(dilation=0), ValueError, r"dilation must be an integer >= 1, got 0"),
        (dict(bias=torch.zeros(3)), ValueError, r"bias must have shape \(6,\), got \(3,\)"),
        (dict(groups=4, weight=torch.zeros(6, 1, 3)), ValueError,
         r"with C_out divisible by groups = 4, got \(6, 1, 3\)"),
        (dict(weight=cw.double()), TypeError, r"weight has dtype torch.float64 but x has dtype"),
    ]
    for kw, exc, match in step_errors:
        args = dict(weight=cw, bias=cb, dilation=1, groups=1)
        args.update(kw)
        with pytest.raises(exc, match=match):
            ops.causal_conv1d_step(xt, st, args["weight"], args["bias"], args["dilation"],
                                   args["groups"])
    with pytest.raises(TypeError, match=r"x_t must be a floating-point tensor, got torch.int64"):
        ops.causal_conv1d_step(xt.long(), st.long(), cw.long(), None)
    with pytest.raises(TypeError, match=r"x_t must be a floating-point tensor, got torch.int64"):
        ops.wavenet_block_step(xt.long(), st, cw, cb, sw, sb, rw, rb)
    with pytest.raises(ValueError, match=r"\(kernel_size - 1\) \* dilation .* exceeds"):
        ops.causal_conv1d_step(xt, torch.zeros(1, 4, 0), cw, cb, dilation=2**63 - 1)
    with pytest.raises(ValueError, match=r"conv_weight must have 2\*gate_channels"):
        ops.wavenet_block_step(xt, st, cw[:5], cb[:5], sw, sb, rw, rb)
    with pytest.raises(ValueError, match=r"res_bias must have shape \(4,\), got \(1,\)"):
        ops.wavenet_block_step(xt, st, cw, cb, sw, sb, rw, rb[:1])


@requires_cpu_ext
def test_fused_wavenet_stack_step_checks_every_layer():
    """The one-call generation step reads raw pointers: a bias of the wrong length or a
    parameter of another dtype must be an error, not an out-of-bounds read or a silent cast."""
    wn = seqkern.nn.WaveNet(3, 4, 5, 3, kernel_size=2, dilation_cycle=2)
    params = [b._step_params() for b in wn.blocks]
    for layer, which, bad, match in [(1, 5, torch.zeros(1), r"res bias of layer 1 is \[1\], expected \(4\)"),
                                     (2, 1, torch.zeros(3), r"conv bias of layer 2 is \[3\], expected \(10\)"),
                                     (0, 0, None, r"conv weight of layer 0 is Double")]:
        blocks = [list(p) for p in params]
        blocks[layer][which] = bad if bad is not None else blocks[layer][which].double()
        with torch.no_grad(), pytest.raises(RuntimeError, match=match):
            ops.wavenet_stack_step(torch.randn(2, 4), wn.initial_state(2),
                                   [tuple(b) for b in blocks], wn.dilations)


@requires_cpu_ext
def test_kernels_refuse_a_look_back_that_overflows():
    """(K − 1)·dilation past 2**31 − 1 is refused by the kernels too (called directly), not
    wrapped around into reads out of bounds. K = 3, dilation = 2**63 − 1 wraps to a small P."""
    x, w = torch.randn(1, 2, 5), torch.randn(2, 2, 3)
    with pytest.raises(ValueError, match=r"\(kernel_size - 1\) \* dilation exceeds 2147483647"):
        seqkern._ext._C.conv_forward(x, w, None, None, 2**62 + 2**40, 1, 0, False)
    wn = seqkern.nn.WaveNet(2, 4, 5, 3, kernel_size=3, dilation_cycle=2)
    with torch.no_grad(), pytest.raises(ValueError, match=r"dilation of layer 0 exceeds"):
        ops.wavenet_stack_step(torch.randn(2, 4), [torch.zeros(2, 4, 2), torch.zeros(2, 4, 4)],
                               [b._step_params() for b in wn.blocks], [2**63 - 1, 2])


@requires_cpu_ext
@pytest.mark.parametrize("bad", ["conv 4-D", "conv 2-D", "skip 1-D", "skip 4-D"])
def test_fused_wavenet_stack_step_checks_weight_ranks(bad):
    """A weight of the wrong rank is an error naming the layer in the one-call step (it
    read a 4-D weight's elements as if it were 3-D)."""
    wn = seqkern.nn.WaveNet(3, 4, 5, 2, kernel_size=2, dilation_cycle=2)
    blocks = [list(b._step_params()) for b in wn.blocks]
    which, t = bad.split()
    i = 0 if which == "conv" else 2
    w = blocks[1][i]
    blocks[1][i] = {"4-D": w.reshape(*w.shape[:2], 1, -1), "2-D": w.flatten(1),
                    "1-D": w.flatten()}[t]
    with torch.no_grad(), pytest.raises(ValueError, match=r"layer 1 has conv weight"):
        ops.wavenet_stack_step(torch.randn(2, 4), wn.initial_state(2),
                               [tuple(b) for b in blocks], wn.dilations)


@pytest.mark.parametrize("activation", [None, "silu", "relu"])
@pytest.mark.parametrize("groups", [1, 4], ids=["dense", "depthwise"])
def test_output_changed_in_place_before_backward(activation, groups):
    """As with F.conv1d (and F.silu after it): the output may be changed in place before the
    backward when the derivative does not come from it; relu reads it, and refuses, as torch."""
    x = torch.randn(2, 4, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 4 // groups, 3, dtype=torch.float64, requires_grad=True)
    y = ops.causal_conv1d(x, w, dilation=2, groups=groups, activation=activation)
    y_ref = ref.causal_conv1d(x, w, dilation=2, groups=groups, activation=activation)
    y += 1.0
    if activation == "relu":
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()
        return
    g = torch.autograd.grad((y * y).sum(), (x, w))
    g_ref = torch.autograd.grad(((y_ref + 1.0) ** 2).sum(), (x, w))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("groups", [1, 2], ids=["dense", "depthwise"])
def test_silu_of_extreme_preactivations_as_torch(dtype, groups):
    """silu(z) = z·σ(z) at |z| up to 3e38 and ±inf: σ is 0 where e^{-z} overflows, so silu is -0
    (and NaN at -inf, 0·-inf), as torch's; it once came out as z·4.5e-39 (-1.35 at -3e38)."""
    z = torch.tensor([float("-inf"), -3e38, -1e30, -1e4, -88.5, -80.0, -1.0, 0.0, 1.0, 1e30,
                      float("inf")])
    x = torch.stack([z, z]).unsqueeze(0).to(dtype).requires_grad_()  # (1, 2, L)
    w = torch.ones(2, 2 // groups, 1, dtype=dtype) / (2 // groups)  # passes z through
    got = ops.causal_conv1d(x, w, None, 1, groups, "silu")
    tol = dict(rtol=1.6e-2, atol=1e-30) if dtype == torch.bfloat16 else {}
    want = F.silu(x.detach().float()).to(dtype).float()
    torch.testing.assert_close(got.float(), want, equal_nan=True, **tol)
    got.backward(torch.ones_like(got))
    xr = x.detach().float().requires_grad_()
    F.silu(xr).backward(torch.ones_like(xr))
    torch.testing.assert_close(x.grad.float(), xr.grad.to(dtype).float(), equal_nan=True, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("groups", [1, 2, 4], ids=["dense", "grouped", "depthwise"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weight_meets_the_zero_history_as_in_torch(dtype, groups, bad):
    """torch's padded conv multiplies the oldest tap by the zero padding: NaN (0·NaN, 0·inf)
    in the first (K−1)·d columns. The kernels skip that history; with a non-finite weight they
    take it as explicit zeros, so the NaN pattern of outputs and gradients is torch's."""
    x = torch.randn(2, 4, 9, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 4 // groups, 3, dtype=dtype)
    w[0, 0, 0] = bad
    w.requires_grad_()
    y = ops.causal_conv1d(x, w, dilation=2, groups=groups, activation="tanh")
    want = torch.tanh(F.conv1d(F.pad(x, (4, 0)), w, dilation=2, groups=groups))
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    g = torch.autograd.grad(y.sum(), (x, w))
    gw = torch.autograd.grad(want.sum(), (x, w))
    if dtype == torch.float32:  # (torch's bf16 backward spreads inf·0 by its own loop order)
        for a, b in zip(g, gw):
            assert torch.equal(torch.isnan(a), torch.isnan(b))
    wn_w = torch.randn(6, 4, 2, dtype=dtype)
    wn_w[1, 2, 0] = bad
    res, skip = ops.wavenet_block(x.detach(), wn_w, None, torch.randn(5, 3, dtype=dtype), None,
                                  torch.randn(4, 3, dtype=dtype), None, dilation=3)
    want_res, want_skip = ref.wavenet_block(x.detach(), wn_w, None, torch.randn(5, 3, dtype=dtype),
                                            None, torch.randn(4, 3, dtype=dtype), None, 3)
    assert torch.equal(torch.isnan(skip), torch.isnan(want_skip))


@pytest.mark.parametrize("groups", [1, 4], ids=["dense", "depthwise"])
def test_relu_backward_passes_the_gradient_at_nan_as_torch(groups):
    """torch's relu backward zeroes only where the output is ≤ 0, so a NaN output passes its
    gradient on; the kernels' did not (bias gradients off by O(1))."""
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    x[0, 1, 3] = float("nan")
    x.requires_grad_()
    w = torch.randn(4, 4 // groups, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    y = ops.causal_conv1d(x, w, b, dilation=1, groups=groups, activation="relu")
    want = torch.relu(F.conv1d(F.pad(x, (1, 0)), w, b, groups=groups))
    g = torch.randn_like(y)
    for a, e in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(want, (x, w, b), g)):
        torch.testing.assert_close(a, e, equal_nan=True)
