"""The C++ recurrent kernels (one layer, one direction) against the reference: outputs, final
states, every gradient; gradcheck in float64; opcheck of the custom ops; dtypes; bad input."""
import os
import random
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import seqkern
from seqkern import registry
from seqkern.ops import rnn as ops
from seqkern.reference import rnn as ref

from conftest import requires_cpu_ext, stable_seed

pytestmark = requires_cpu_ext

VARIANTS = [("rnn_tanh", {}), ("rnn_relu", {}), ("lstm", {}), ("lstm", {"peep": True}),
            ("lstm", {"proj": True}), ("lstm", {"peep": True, "proj": True}), ("gru", {}),
            ("gru_cho", {})]
VIDS = ["rnn_tanh", "rnn_relu", "lstm", "lstm_peephole", "lstm_proj", "lstm_peep_proj", "gru",
        "gru_cho"]


def make_case(mode, B, I, H, lengths, dtype, peep=False, proj=False, bias=True, scale=0.5):
    G = ref.gate_count(mode)
    P = max(1, H // 2) if proj else H
    w = {"w_ih": torch.randn(G * H, I, dtype=dtype) * scale,
         "w_hh": torch.randn(G * H, P, dtype=dtype) * scale}
    if bias:
        w["b_ih"] = torch.randn(G * H, dtype=dtype) * scale
        w["b_hh"] = torch.randn(G * H, dtype=dtype) * scale
    if peep:
        w["w_peep"] = torch.randn(3, H, dtype=dtype) * scale
    if proj:
        w["w_hr"] = torch.randn(P, H, dtype=dtype) * scale
    T = int(max(lengths))
    x = torch.randn(T, B, I, dtype=dtype)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=True)
    h0 = torch.randn(B, P, dtype=dtype)
    c0 = torch.randn(B, H, dtype=dtype) if mode == "lstm" else None
    return packed.data, packed.batch_sizes, h0, c0, w


def run_both(mode, x, bs, h0, c0, w, reverse):
    """(outputs, grads) from the cpu kernel and from the reference, same upstream gradients."""
    leaves = [x, h0] + ([c0] if c0 is not None else []) + list(w.values())
    results = []
    for backend in ("cpu", "reference"):
        ls = [t.detach().clone().requires_grad_(True) for t in leaves]
        xx, hh = ls[0], ls[1]
        cc = ls[2] if c0 is not None else None
        ww = dict(zip(w.keys(), ls[2 + (c0 is not None):]))
        with seqkern.use_backend(backend):
            out, hn, cn = ops.recurrent_layer(mode, xx, bs, hh, cc, ww, reverse)
        g = torch.Generator().manual_seed(7)
        loss = (out.double() * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum()
        loss = loss + (hn.double() * torch.randn(hn.shape, generator=g, dtype=torch.float64)).sum()
        if cn is not None:
            loss = loss + (cn.double() * torch.randn(cn.shape, generator=g, dtype=torch.float64)).sum()
        grads = torch.autograd.grad(loss, ls)
        results.append(([out, hn] + ([cn] if cn is not None else []), list(grads)))
    return results


@pytest.mark.parametrize("mode,kw", VARIANTS, ids=VIDS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("B,I,H,lengths", [
    (1, 1, 1, [1]), (3, 17, 3, [5, 5, 5]), (4, 3, 17, [9, 6, 6, 1]), (2, 64, 129, [4, 2]),
    (5, 129, 64, [13, 8, 7, 3, 3])])
def test_kernel_matches_reference_float64(mode, kw, reverse, B, I, H, lengths):
    x, bs, h0, c0, w = make_case(mode, B, I, H, lengths, torch.float64, **kw)
    (o1, g1), (o2, g2) = run_both(mode, x, bs, h0, c0, w, reverse)
    for a, b in zip(o1 + g1, o2 + g2):
        assert a.shape == b.shape
        # Gradients reach several hundred while single elements cancel to near zero, so the
        # absolute floor scales with the tensor: summation order alone (MKL picks kernels per
        # CPU) moved such elements by 4e-11 on an AMD Zen 5, about 1e-13 of the tensor's size.
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, atol=1e-11 * scale, rtol=1e-9)


@pytest.mark.parametrize("mode,kw", VARIANTS, ids=VIDS)
def test_kernel_float32_within_torch_error(mode, kw):
    """float32 error against the float64 reference stays within 2x (plus a floor) of the error of
    the reference itself computed in float32 — i.e. of plain PyTorch in the same dtype.

    Weights at torch.nn's scale (~1/√H). With make_case's default (0.5, spectral norm ≈ 6 at
    H = 40) a tanh RNN is chaotic: any rounding difference grows ~1.3× per step, torch's own
    float32 error reaches 1e-3 after 30 steps, and comparing two such errors measures luck."""
    x, bs, h0, c0, w = make_case(mode, 6, 33, 40, [30, 30, 22, 10, 5, 1], torch.float64,
                                 scale=40 ** -0.5, **kw)
    with seqkern.use_backend("reference"):
        exact = ops.recurrent_layer(mode, x, bs, h0, c0, w, False)
        f32 = lambda t: None if t is None else t.float()  # noqa: E731
        torch32 = ops.recurrent_layer(mode, f32(x), bs, f32(h0), f32(c0),
                                      {k: f32(v) for k, v in w.items()}, False)
    with seqkern.use_backend("cpu"):
        ours = ops.recurrent_layer(mode, f32(x), bs, f32(h0), f32(c0),
                                   {k: f32(v) for k, v in w.items()}, False)
    for e, t, o in zip(exact, torch32, ours):
        if e is None:
            continue
        err_t = (t.double() - e).abs().max().item()
        err_o = (o.double() - e).abs().max().item()
        assert err_o <= 2 * err_t + 1e-5, (err_o, err_t)


def check_bfloat16_forward(mode, x, xb, bs, h0, c0, w, reverse, slack):
    """Runs the kernel on bf16 inputs (x given as xb) and checks outputs and final states: error
    against the float64 reference at most 2x that of the reference run in bf16, plus slack."""
    bf = lambda t: None if t is None else t.bfloat16()  # noqa: E731
    wb = {k: bf(v) for k, v in w.items()}
    with seqkern.use_backend("reference"):
        exact = ops.recurrent_layer(mode, x, bs, h0, c0, w, reverse)
        ref_bf = ops.recurrent_layer(mode, bf(x), bs, bf(h0), bf(c0), wb, reverse)
    ours = ops.recurrent_layer(mode, xb, bs, bf(h0), bf(c0), wb, reverse)
    for e, t, o in zip(exact, ref_bf, ours):
        if e is None:
            continue
        err_t = (t.double() - e).abs().max().item()
        err_o = (o.double() - e).abs().max().item()
        assert err_o <= 2 * err_t + slack, (err_o, err_t)
    return ours


@pytest.mark.parametrize("mode,kw", VARIANTS, ids=VIDS)
def test_kernel_bfloat16(mode, kw):
    x, bs, h0, c0, w = make_case(mode, 4, 24, 20, [12, 9, 9, 2], torch.float64, **kw)
    xb = x.bfloat16().requires_grad_(True)
    ours = check_bfloat16_forward(mode, x, xb, bs, h0, c0, w, False, 1e-2)
    assert ours[0].dtype == torch.bfloat16
    ours[0].float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()


def bf16_path(path, monkeypatch):
    """Selects the bf16 recurrence path: 'brgemm' (oneDNN tiles; skipped where this build and
    CPU have none, since the fp32 loop then serves bf16 and is tested as 'fp32_loop')."""
    if path == "brgemm" and not (registry.availability("cpu")[0]
                                 and seqkern._ext._C.recurrent_bf16_tiles()):
        pytest.skip("no bf16 tiles in this build/CPU (neither AMX nor AVX512_BF16): the fp32 loop serves bf16")
    monkeypatch.setenv("SEQKERN_RNN_AMX", "1" if path == "brgemm" else "0")


@pytest.mark.parametrize("mode,kw", [("rnn_tanh", {}), ("rnn_relu", {}), ("lstm", {}),
                                     ("lstm", {"peep": True}), ("gru", {})])
@pytest.mark.parametrize("I,H", [(24, 40), (17, 33)], ids=["I_even", "I_odd_H_odd"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("path", ["brgemm", "brgemm_apart", "fp32_loop"])
def test_kernel_bfloat16_batched(mode, kw, I, H, reverse, path, monkeypatch):
    """bfloat16 at a batch (B = 9, ragged lengths) that takes the fused loop, with its products
    on bf16 tiles (AMX or AVX512_BF16; B = 9 rows and K padded to whole AMX tiles) or in fp32:
    on tiles, with I even the input projection is done per step as well (or, 'apart', forced
    to one GEMM beforehand), with I odd it is one GEMM. Outputs and final states within 2x the
    error of the reference run in bf16, against float64."""
    bf16_path(path.split("_")[0], monkeypatch)
    if path == "brgemm_apart":
        monkeypatch.setenv("SEQKERN_RNN_BF16_FUSE", "0")
    x, bs, h0, c0, w = make_case(mode, 9, I, H, [14, 14, 13, 11, 9, 9, 5, 2, 1], torch.float64,
                                 scale=0.3, **kw)
    check_bfloat16_forward(mode, x, x.bfloat16(), bs, h0, c0, w, reverse, 1e-3)


@pytest.mark.parametrize("mode,kw", [("rnn_relu", {}), ("lstm", {}), ("lstm", {"peep": True}),
                                     ("gru", {})])
@pytest.mark.parametrize("I", [24, 17], ids=["I_even", "I_odd"])
@pytest.mark.parametrize("B", [16, 70])
@pytest.mark.parametrize("reverse", [False, True])
def test_kernel_bfloat16_many_rows(mode, kw, I, B, reverse, monkeypatch):
    """bfloat16 on bf16 tiles from 16 rows, where on AMX each tile's gate math runs inside the
    next tile's products (double-buffered accumulators; B = 70: two row blocks per panel), with
    ragged lengths (the rows shrink step by step, across a block edge at B = 70), I even (x in
    the per-step product; GRU: its own product) and odd (one GEMM beforehand), both directions."""
    bf16_path("brgemm", monkeypatch)
    rng = random.Random(stable_seed(mode, I, B, reverse))
    lengths = sorted((rng.randint(1, 12) for _ in range(B)), reverse=True)
    lengths[0] = 12
    x, bs, h0, c0, w = make_case(mode, B, I, 40, lengths, torch.float64, scale=0.3, **kw)
    check_bfloat16_forward(mode, x, x.bfloat16(), bs, h0, c0, w, reverse, 1e-3)


@pytest.mark.parametrize("mode", ["lstm", "rnn_tanh", "gru"])
@pytest.mark.parametrize("B", [8, 16])
def test_kernel_bfloat16_weights_past_l2(mode, B, monkeypatch):
    """bfloat16 on brgemm tiles with I = H = 512, two threads: either side of
    fuse_bf16_projection's rule. LSTM (2 MB of bf16 weights per thread) and GRU (1.5 MB) do
    x·W_ihᵀ as one GEMM beforehand at B = 8 and in each step's product at B = 16; the RNN's
    weights (0.5 MB) fit in L2 and are fused at both. Outputs and final states within 2x the
    reference's bf16 error."""
    bf16_path("brgemm", monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, bs, h0, c0, w = make_case(mode, B, 512, 512, [3] * B, torch.float64,
                                     scale=512 ** -0.5)
        check_bfloat16_forward(mode, x, x.bfloat16(), bs, h0, c0, w, False, 1e-3)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_kernel_bfloat16_with_mkldnn_disabled(mode, monkeypatch):
    """torch.backends.mkldnn turned off at run time takes oneDNN's brgemm away: the bf16 loop
    must still run (on seqkern's own tiles or in fp32), not throw inside its parallel region."""
    bf16_path("brgemm", monkeypatch)
    x, bs, h0, c0, w = make_case(mode, 9, 24, 40, [6] * 9, torch.float64, scale=0.3)
    with torch.backends.mkldnn.flags(enabled=False):
        check_bfloat16_forward(mode, x, x.bfloat16(), bs, h0, c0, w, False, 1e-3)


def layer_grads(backend, mode, x, bs, h0, c0, w, dtype, reverse):
    """Gradients of a fixed random projection of (out, h_n, c_n) with respect to x, h0, c0 and
    every weight, the layer run by `backend` on leaves cast to dtype; returned in float64."""
    leaves = [x, h0] + ([c0] if c0 is not None else []) + list(w.values())
    ls = [t.detach().to(dtype).requires_grad_(True) for t in leaves]
    cc = ls[2] if c0 is not None else None
    ww = dict(zip(w.keys(), ls[2 + (c0 is not None):]))
    with seqkern.use_backend(backend):
        outs = ops.recurrent_layer(mode, ls[0], bs, ls[1], cc, ww, reverse)
    g = torch.Generator().manual_seed(3)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum()
               for o in outs if o is not None)
    return [t.double() for t in torch.autograd.grad(loss, ls)]


@pytest.mark.parametrize("mode,kw", VARIANTS, ids=VIDS)
@pytest.mark.parametrize("lengths", [[1], [3, 3], [15], [5, 5, 4], [4, 4, 3, 3], [20, 2]],
                         ids=["T1_B1", "T3_B2", "T15_B1", "T5_B3", "T4_B4", "T20_B2"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("reverse", [False, True])
def test_kernel_bfloat16_few_rows(mode, kw, lengths, grad, reverse):
    """bfloat16 with up to 4 rows: one step (T = 1) on the cells' kernel with bf16 weights,
    fewer than 16 rows in all on per-step few-row products over the bf16 W_hh (h rounded to
    bf16), more on the fused loop's bf16 register tiles where they serve; outputs and final
    states (and with `grad` every gradient) within 2x the error of the reference run in bf16,
    against float64."""
    x, bs, h0, c0, w = make_case(mode, len(lengths), 17, 33, lengths, torch.float64, scale=0.3,
                                 **kw)
    xb = x.bfloat16().requires_grad_(grad)
    ours = check_bfloat16_forward(mode, x, xb, bs, h0, c0, w, reverse, 1e-3)
    assert ours[0].dtype == torch.bfloat16
    if grad:
        check_bfloat16_gradients(mode, x, bs, h0, c0, w, reverse)


@pytest.mark.parametrize("mode", ["rnn_tanh", "lstm", "gru"])
@pytest.mark.parametrize("I", [24, 17], ids=["I_even", "I_odd"])
@pytest.mark.parametrize("path", ["brgemm", "fp32_loop"])
def test_kernel_bfloat16_gradients(mode, I, path, monkeypatch):
    """bfloat16 gradients at B = 9 (dW, dx as bf16 GEMMs; the per-step dgates·W_hh on brgemm
    tiles or in fp32): each within 2x the error of the reference run in bf16, against float64."""
    bf16_path(path, monkeypatch)
    x, bs, h0, c0, w = make_case(mode, 9, I, 33, [14, 14, 13, 11, 9, 9, 5, 2, 1], torch.float64,
                                 scale=0.3)
    check_bfloat16_gradients(mode, x, bs, h0, c0, w)


def check_bfloat16_gradients(mode, x, bs, h0, c0, w, reverse=False):
    """Every gradient of the kernel run in bf16 within 2x the error of the reference run in bf16
    (plus 1 % of the largest), against float64."""
    exact = layer_grads("reference", mode, x, bs, h0, c0, w, torch.float64, reverse)
    ref_bf = layer_grads("reference", mode, x, bs, h0, c0, w, torch.bfloat16, reverse)
    ours = layer_grads("cpu", mode, x, bs, h0, c0, w, torch.bfloat16, reverse)
    for e, t, o in zip(exact, ref_bf, ours):
        err_t = (t - e).abs().max().item()
        err_o = (o - e).abs().max().item()
        assert err_o <= 2 * err_t + 1e-2 * e.abs().max().item(), (err_o, err_t)


@pytest.mark.parametrize("mode", ["rnn_tanh", "lstm", "gru"])
@pytest.mark.parametrize("I", [24, 17], ids=["I_even", "I_odd"])
def test_kernel_bfloat16_gradients_many_rows(mode, I, monkeypatch):
    """As test_kernel_bfloat16_gradients at B = 40 and ragged lengths: the training forward
    (gates saved) with each tile's gate math inside the next tile's products, on AMX."""
    bf16_path("brgemm", monkeypatch)
    rng = random.Random(stable_seed(mode, I, "grad"))
    lengths = sorted((rng.randint(1, 10) for _ in range(40)), reverse=True)
    lengths[0] = 10
    x, bs, h0, c0, w = make_case(mode, 40, I, 33, lengths, torch.float64, scale=0.3)
    check_bfloat16_gradients(mode, x, bs, h0, c0, w)


@pytest.mark.parametrize("mode,kw", VARIANTS, ids=VIDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck_float64(mode, kw, reverse):
    x, bs, h0, c0, w = make_case(mode, 3, 4, 5, [4, 3, 1], torch.float64, **kw)
    keys = list(w.keys())
    inputs = [x, h0] + ([c0] if c0 is not None else []) + [w[k] for k in keys]
    inputs = [t.requires_grad_(True) for t in inputs]

    def f(*args):
        xx, hh = args[0], args[1]
        cc = args[2] if c0 is not None else None
        ww = dict(zip(keys, args[2 + (c0 is not None):]))
        out, hn, cn = ops.recurrent_layer(mode, xx, bs, hh, cc, ww, reverse)
        return (out, hn) + ((cn,) if cn is not None else ())

    with seqkern.use_backend("cpu"):
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode,kw", VARIANTS, ids=VIDS)
def test_opcheck(mode, kw):
    x, bs, h0, c0, w = make_case(mode, 3, 5, 6, [4, 4, 2], torch.float32, **kw)
    args = [w.get(k) for k in ("w_ih", "w_hh", "b_ih", "b_hh", "w_peep", "w_hr")]
    # inference form (save=False) on plain tensors, training form on leaves that need grad
    torch.library.opcheck(ops._recurrent_layer_op, (mode, x, bs, h0, c0, *args, False, False))
    for t in [x, h0, c0] + args:
        if t is not None:
            t.requires_grad_(True)
    torch.library.opcheck(ops._recurrent_layer_op, (mode, x, bs, h0, c0, *args, True, True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_opcheck_low_precision(mode, dtype):
    """The registration in bfloat16 (at a batch, B = 9, that takes the brgemm path where present)
    and float16 (computed in float32)."""
    x, bs, h0, c0, w = make_case(mode, 9, 8, 16, [5, 5, 4, 4, 3, 3, 2, 2, 1], torch.float32)
    bf = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    x, h0, c0 = bf(x), bf(h0), bf(c0)
    args = [bf(w.get(k)) for k in ("w_ih", "w_hh", "b_ih", "b_hh", "w_peep", "w_hr")]
    torch.library.opcheck(ops._recurrent_layer_op, (mode, x, bs, h0, c0, *args, False, False))
    for t in [x, h0, c0] + args:
        if t is not None:
            t.requires_grad_(True)
    torch.library.opcheck(ops._recurrent_layer_op, (mode, x, bs, h0, c0, *args, True, True))


def test_non_contiguous_inputs():
    x, bs, h0, c0, w = make_case("lstm", 4, 10, 8, [6, 6, 6, 6], torch.float64)
    xt = torch.randn(24, 20, dtype=torch.float64)[:, ::2]  # strided view
    w_nc = {k: (v.t().contiguous().t() if v.dim() == 2 else v) for k, v in w.items()}
    h0_nc = torch.randn(8, 4, dtype=torch.float64).t()
    (o1, g1), (o2, g2) = run_both("lstm", xt, bs, h0_nc, c0, w_nc, False)
    for a, b in zip(o1 + g1, o2 + g2):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


def test_double_backward_raises():
    x, bs, h0, c0, w = make_case("gru", 2, 3, 4, [3, 2], torch.float64)
    x.requires_grad_(True)
    out, _, _ = ops.recurrent_layer("gru", x, bs, h0, c0, w)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), x, create_graph=True)
    (g,) = torch.autograd.grad(out.sum(), x)  # first-order gradients still work
    assert torch.isfinite(g).all()


@settings(max_examples=15, deadline=None)
@given(mode=st.sampled_from(ref.MODES), B=st.integers(1, 6), I=st.integers(1, 20),
       H=st.integers(1, 20), T=st.integers(1, 12), reverse=st.booleans(), data=st.data())
def test_random_shapes_property(mode, B, I, H, T, reverse, data):
    lengths = sorted(data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B)), reverse=True)
    x, bs, h0, c0, w = make_case(mode, B, I, H, lengths, torch.float64)
    (o1, g1), (o2, g2) = run_both(mode, x, bs, h0, c0, w, reverse)
    for a, b in zip(o1 + g1, o2 + g2):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


class TestBadInput:
    def setup_method(self):
        self.x, self.bs, self.h0, self.c0, self.w = make_case("lstm", 3, 5, 6, [4, 4, 2],
                                                              torch.float32)

    def test_wrong_rank(self):
        with pytest.raises(ValueError, match="x must be packed"):
            ops.recurrent_layer("lstm", self.x[None], self.bs, self.h0, self.c0, self.w)

    def test_wrong_feature_size(self):
        with pytest.raises(ValueError, match=r"w_ih must be \(4\*hidden_size, 7\)"):
            ops.recurrent_layer("lstm", torch.randn(10, 7), self.bs, self.h0, self.c0, self.w)

    def test_wrong_h0(self):
        with pytest.raises(ValueError, match=r"c0 must be \(2, 6\)"):
            ops.recurrent_layer("lstm", self.x, self.bs, self.h0[:2], self.c0, self.w)

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match="h0 must have x's dtype"):
            ops.recurrent_layer("lstm", self.x, self.bs, self.h0.double(), self.c0, self.w)

    def test_unknown_mode(self):
        with pytest.raises(ValueError, match="mode must be one of"):
            ops.recurrent_layer("lstmx", self.x, self.bs, self.h0, self.c0, self.w)

    def test_cpp_checks_batch_sizes(self):
        bad = torch.tensor([3, 2, 3, 2])  # increases at t = 2
        with pytest.raises(RuntimeError, match="non-increasing"):
            seqkern._ext._C.recurrent_forward("lstm", self.x, bad, self.h0, self.c0,
                                              self.w["w_ih"], self.w["w_hh"], None, None, None,
                                              None, False, False)


def check_float32_within_torch_error(mode, x, bs, h0, c0, w, reverse, threads):
    """The float64 case run in float32 on `threads` threads: outputs and gradients within 2×
    (plus a floor) of plain PyTorch's float32 error against the float64 reference."""
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _, (o64, g64) = run_both(mode, x, bs, h0, c0, w, reverse)  # float64 reference
        (o32, g32), (r32, rg32) = run_both(mode, f32(x), bs, f32(h0), f32(c0),
                                           {k: f32(v) for k, v in w.items()}, reverse)
    finally:
        torch.set_num_threads(old)
    for exact, ours, plain in zip(o64 + g64, o32 + g32, r32 + rg32):
        err_o = (ours.double() - exact).abs().max().item()
        err_t = (plain.double() - exact).abs().max().item()
        assert err_o <= 2 * err_t + 2e-5, (err_o, err_t)


@pytest.mark.parametrize("mode,kw", [("rnn_tanh", {}), ("rnn_relu", {}), ("lstm", {}),
                                     ("lstm", {"peep": True}), ("gru", {})])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("threads,split", [(1, None), (2, None), (2, "units"), (2, "rows")])
@pytest.mark.parametrize("I,projection", [(20, "steps"), (300, "gemm"), (300, "up_front")],
                         ids=["projection_in_steps", "projection_gemm", "projection_up_front"])
def test_fused_float32_threads_and_partial_panels(mode, kw, reverse, threads, split, I,
                                                 projection, monkeypatch):
    """Sizes that take the fused float32 loop (H = 129 leaves a partial vector panel, the batch
    is ragged) on one and two threads: forward and gradients within the tolerance rule of the
    float64 reference. The input projection is accumulated in each step's tiles (I = 20),
    read from one MKL GEMM over all steps (gate-major), or made by the loop's threads before
    the first step in its panel order, H = 129 leaving a partial last panel (I = 300), each
    forced (SEQKERN_RNN_FUSE, SEQKERN_RNN_XG_LOOP). Two threads share each step's hidden
    units or split the batch rows (by work: the rows are sorted by length), forced both ways
    in forward and backward, besides the default choice."""
    monkeypatch.setenv("SEQKERN_RNN_FUSE", "1" if projection == "steps" else "0")
    monkeypatch.setenv("SEQKERN_RNN_XG_LOOP", "1" if projection == "up_front" else "0")
    for var in ("SEQKERN_RNN_SPLIT", "SEQKERN_RNN_SPLIT_BWD"):
        if split:
            monkeypatch.setenv(var, split)
        else:
            monkeypatch.delenv(var, raising=False)
    x, bs, h0, c0, w = make_case(mode, 9, I, 129, [23, 23, 20, 17, 9, 9, 4, 2, 1],
                                 torch.float64, scale=0.2, **kw)
    check_float32_within_torch_error(mode, x, bs, h0, c0, w, reverse, threads)


@pytest.mark.parametrize("mode,kw", [("rnn_tanh", {}), ("lstm", {}), ("lstm", {"peep": True}),
                                     ("gru", {})])
@pytest.mark.parametrize("T", [4, 9, 15])
@pytest.mark.parametrize("H", [1, 17, 128, 129])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_float32_single_short_sequence(mode, kw, T, H, threads):
    """One sequence of 4..15 steps takes the fused loop when W_hh is at most 256 KB (LSTM
    H = 128 is exactly that, H = 129 just over it: the per-step loop), forward and backward
    alike: results and gradients within the tolerance rule of the float64 reference."""
    x, bs, h0, c0, w = make_case(mode, 1, 23, H, [T], torch.float64, scale=H ** -0.5, **kw)
    check_float32_within_torch_error(mode, x, bs, h0, c0, w, False, threads)
    check_float32_within_torch_error(mode, x, bs, h0, c0, w, True, threads)


_SMALLER_TEAM = """
import torch
from seqkern.ops import rnn as ops
torch.manual_seed(0)
torch.set_num_threads(2)
w = {"w_ih": torch.randn(64, 32) * 0.2, "w_hh": torch.randn(64, 64) * 0.2}
x, h0 = torch.randn(20 * 16, 32), torch.zeros(16, 64)
bs = torch.full((20,), 16, dtype=torch.int64)
out, hn, _ = ops.recurrent_layer("rnn_tanh", x, bs, h0, None, w)
ref = torch.nn.functional.linear
h, want = h0, []
for t in range(20):
    h = torch.tanh(ref(x[t * 16:(t + 1) * 16], w["w_ih"]) + ref(h, w["w_hh"]))
    want.append(h)
err = (out - torch.cat(want)).abs().max().item()
print("ERR", err)
assert err < 1e-4, err
"""


@pytest.mark.parametrize("split", ["units", "rows", "auto"])
def test_fused_loop_with_a_smaller_openmp_team(split):
    """OpenMP may start fewer threads than asked (OMP_THREAD_LIMIT, nested regions): the batch
    rows must then be split over the threads that did start (review: rows owned by a thread id
    that never ran were left unwritten)."""
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    env.pop("SEQKERN_RNN_SPLIT", None)
    if split != "auto":
        env["SEQKERN_RNN_SPLIT"] = split
    r = subprocess.run([sys.executable, "-c", _SMALLER_TEAM], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("mode", ["rnn_tanh", "lstm", "gru"])
@pytest.mark.parametrize("split", ["units", "rows"])
@pytest.mark.parametrize("reverse", [False, True])
def test_fused_float32_many_rows_per_thread(mode, split, reverse, monkeypatch):
    """40 ragged rows and H = 200, where each thread's share of the rows is swept one k block
    of the weight panels at a time (panels larger than L1), rows split either way."""
    monkeypatch.setenv("SEQKERN_RNN_SPLIT", split)
    monkeypatch.setenv("SEQKERN_RNN_SPLIT_BWD", split)
    gen = torch.Generator().manual_seed(40)
    lengths = sorted(torch.randint(1, 31, (40,), generator=gen).tolist(), reverse=True)
    x, bs, h0, c0, w = make_case(mode, 40, 20, 200, lengths, torch.float64, scale=0.1)
    check_float32_within_torch_error(mode, x, bs, h0, c0, w, reverse, 2)


@pytest.mark.parametrize("mode", ["rnn_tanh", "lstm", "gru"])
def test_nan_input_propagates(mode):
    """A NaN in one sequence's input reaches that sequence's later outputs as NaN (the gate
    functions clamp their argument, which must not turn NaN into a finite value) and leaves the
    other sequences untouched. Sizes take the fused float32 loop."""
    x, bs, h0, c0, w = make_case(mode, 8, 5, 40, [12] * 8, torch.float32, scale=0.3)
    x = x.clone()
    x[3 * 8 + 2, 0] = float("nan")  # step 3, sequence 2 (packed rows are time-major)
    out, _, _ = ops.recurrent_layer(mode, x, bs, h0, c0, w, False)
    out = out.view(12, 8, -1)
    assert torch.isnan(out[3:, 2]).all()
    assert torch.isfinite(out[:3]).all()
    assert torch.isfinite(out[:, [0, 1, 3, 4, 5, 6, 7]]).all()


@pytest.mark.parametrize("mode,kw", VARIANTS, ids=VIDS)
@pytest.mark.parametrize("B", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("I,H,bias", [(17, 33, True), (300, 129, False), (1, 8, True)])
def test_single_step_few_rows(mode, kw, B, I, H, bias):
    """One step of at most 4 rows (cells, streaming step()) takes the few-row product path
    (both products in one pass over the weights; B = 5 does not): equal to the reference,
    outputs and gradients, with vector tails in I and H and the last row block partial."""
    x, bs, h0, c0, w = make_case(mode, B, I, H, [1] * B, torch.float64, bias=bias, **kw)
    (o1, g1), (o2, g2) = run_both(mode, x, bs, h0, c0, w, False)
    for a, b in zip(o1 + g1, o2 + g2):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)
    with torch.no_grad():  # the inference call skips autograd's Python dispatch
        got = ops.recurrent_layer(mode, x.float(), bs, h0.float(),
                                  c0.float() if c0 is not None else None,
                                  {k: t.float() for k, t in w.items()})
    for a, b in zip(got, o2):
        if a is not None:
            torch.testing.assert_close(a.double(), b.detach(), atol=2e-5, rtol=2e-5)


@requires_cpu_ext
def test_cpp_rejects_misshapen_biases_and_saved_tensors():
    """The modules skip the per-layer Python checks (the kernel repeats them): a direct call with
    a wrong-sized bias, peephole or saved activation gets a clear error, not a read past it."""
    from seqkern import _ext

    x, bs, h0 = torch.randn(6, 5), torch.full((3,), 2, dtype=torch.int64), torch.zeros(2, 7)
    w_ih, w_hh = torch.randn(21, 5), torch.randn(21, 7)
    with pytest.raises(RuntimeError, match=r"bias_ih must be \(21,\)"):
        _ext._C.recurrent_forward("gru", x, bs, h0, None, w_ih, w_hh, torch.randn(20),
                                  torch.randn(21), None, None, False, False)
    with pytest.raises(RuntimeError, match=r"bias_hh must be \(21,\)"):
        _ext._C.recurrent_forward("gru", x, bs, h0, None, w_ih, w_hh, None, torch.randn(3, 7),
                                  None, None, False, False)
    c0 = torch.zeros(2, 7)
    with pytest.raises(RuntimeError, match=r"weight_peep must be \(3, 7\)"):
        _ext._C.recurrent_forward("lstm", x, bs, h0, c0, torch.randn(28, 5), torch.randn(28, 7),
                                  None, None, torch.randn(3, 6), None, False, False)
    with pytest.raises(RuntimeError, match="weight_hh must have x's dtype"):
        _ext._C.recurrent_forward("gru", x, bs, h0, None, w_ih, w_hh.double(), None, None, None,
                                  None, False, False)
    out, h_n, c_n, g, c, hp = _ext._C.recurrent_forward("gru", x, bs, h0, None, w_ih, w_hh, None,
                                                        None, None, None, False, True)
    with pytest.raises(RuntimeError, match="ws_gates must be"):
        _ext._C.recurrent_backward("gru", torch.randn(6, 7), None, None, x, bs, w_ih, w_hh, None,
                                   None, None, None, out, g[:, :7], c, hp, False)
    with pytest.raises(RuntimeError, match="grad_out must be"):
        _ext._C.recurrent_backward("gru", torch.randn(6, 8), None, None, x, bs, w_ih, w_hh, None,
                                   None, None, None, out, g, c, hp, False)


@requires_cpu_ext
def test_module_trains_after_a_first_call_under_inference_mode():
    """The padded batch_sizes tensor a module keeps between calls must not be an inference
    tensor: autograd saves it for the backward."""
    m = seqkern.nn.GRU(4, 5)
    x = torch.randn(6, 2, 4)
    with torch.inference_mode():
        m(x)
    out, _ = m(x)
    out.sum().backward()
    assert m.weight_hh_l0.grad is not None


@requires_cpu_ext
def test_dispatch_modes_and_tracing_see_the_registered_op():
    """Eager calls skip the custom op's dispatch; a dispatch mode (FlopCounterMode) or make_fx
    must still see the registered op, and get the eager result."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils.flop_counter import FlopCounterMode

    m = seqkern.nn.LSTM(4, 5).eval()
    x = torch.randn(6, 2, 4)
    with torch.no_grad():
        want, _ = m(x)
        with FlopCounterMode(display=False):
            got, _ = m(x)
        torch.testing.assert_close(got, want)
        gm = make_fx(lambda t: m(t)[0])(x)
    assert "seqkern.recurrent_layer" in gm.code
    torch.testing.assert_close(gm(x), want)


@pytest.mark.parametrize("bs", [[2, 3, 1], [2, 2, 1], [2, 2, 2, 2], [3, 3]])
def test_reference_rejects_a_malformed_packed_layout(bs):
    """The reference path (float16, torch.func, use_backend) checks batch_sizes as the C++
    kernels do, instead of failing inside index_copy or a view."""
    x, h0 = torch.randn(6, 3), torch.randn(2, 4)
    w = {"w_ih": torch.randn(12, 3), "w_hh": torch.randn(12, 4)}
    with seqkern.use_backend("reference"), pytest.raises(ValueError, match="batch_sizes"):
        seqkern.ops.recurrent_layer("gru", x, torch.tensor(bs), h0, None, w)


@pytest.mark.parametrize("B", [1, 8, 32])
def test_relu_rnn_gradient_through_a_nan_as_torch(B):
    """A NaN input: torch's relu backward passes the gradient through the NaN output (it zeroes
    only where h ≤ 0); so do the kernels now, on every batch path (they gave 0)."""
    torch.manual_seed(0)
    m = seqkern.nn.RNN(4, 6, nonlinearity="relu")
    t = torch.nn.RNN(4, 6, nonlinearity="relu")
    t.load_state_dict(m.state_dict())
    x = torch.randn(7, B, 4)
    x[3, 0, 2] = float("nan")
    grads = []
    for mod in (m, t):
        xx = x.clone().requires_grad_()
        y, _ = mod(xx)
        g = torch.autograd.grad(y, [xx] + list(mod.parameters()), torch.ones_like(y) * 0.1)
        grads.append(g)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, equal_nan=True, atol=1e-5, rtol=1e-4)
