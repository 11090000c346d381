"""Triton attention under the interpreter (TRITON_INTERPRET=1, CPU tensors) against the
reference: flash forward, dQ/dK/dV, every mask kind, GQA, the split-key decode kernel, and
the KV-cache streaming form. L=37, D=40: not multiples of the 32-wide interpreter tiles."""
import math

import pytest
import torch

from conftest import triton_interpreter_or_skip

triton_interpreter_or_skip()
from seqkern.triton import attention as tattn  # noqa: E402

import seqkern  # noqa: E402
from seqkern.reference import attention as ref  # noqa: E402

pytestmark = pytest.mark.triton
TOL = dict(atol=2e-5, rtol=2e-5)


def qkv(B=1, Hq=2, Hkv=2, Lq=37, Lk=37, D=40, DV=None):
    return (torch.randn(B, Hq, Lq, D, requires_grad=True),
            torch.randn(B, Hkv, Lk, D, requires_grad=True),
            torch.randn(B, Hkv, Lk, DV or D, requires_grad=True))


def compare(q, k, v, **kw):
    """Public API on the triton backend vs the reference: output and all three gradients."""
    gqa = q.dim() == 4 and q.shape[1] != k.shape[1]
    with seqkern.use_backend("triton"):
        got = seqkern.ops.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, **kw)
    want = ref.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, **kw)
    torch.testing.assert_close(got, want, **TOL)
    g = torch.randn_like(got)
    for name, a, b in zip("qkv", torch.autograd.grad(got, (q, k, v), g),
                          torch.autograd.grad(want, (q, k, v), g)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"d{name}: {m}")
    return got


CASES = {
    "plain": (dict(), dict()),
    "causal_top_left": (dict(), dict(is_causal=True)),
    "causal_bottom_right_kv_longer": (dict(Lq=20), dict(is_causal=True,
                                                        causal_alignment="bottom_right")),
    # Lq > Lk bottom-right: the first Lq − Lk query rows see no key at all → zeros, not NaN.
    "causal_bottom_right_dead_rows": (dict(Lk=20), dict(is_causal=True,
                                                        causal_alignment="bottom_right")),
    "sliding_window": (dict(), dict(is_causal=True, window=5)),
    "gqa_window_bottom_right": (dict(Hq=4, Hkv=1, Lq=9), dict(is_causal=True, window=6,
                                                              causal_alignment="bottom_right")),
    "value_dim_differs": (dict(DV=24), dict(is_causal=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_flash_forward_backward(case):
    shape, kw = CASES[case]
    compare(*qkv(**shape), **kw)


def test_key_lengths_including_empty_sequence():
    q, k, v = qkv(B=3, Hq=1, Hkv=1, Lq=5)
    out = compare(q, k, v, key_lengths=torch.tensor([37, 0, 33]))
    assert out[1].abs().max() == 0     # no key → zero rows


def test_bool_mask_with_causal_and_gqa():
    q, k, v = qkv(B=2, Hq=2, Hkv=1, Lq=33, Lk=37)
    mask = torch.rand(2, 1, 33, 37) > 0.4      # broadcast over heads
    compare(q, k, v, attn_mask=mask, is_causal=True, causal_alignment="bottom_right")


def test_additive_mask_three_dim_inputs():
    q, k, v = (torch.randn(2, 37, 40, requires_grad=True) for _ in range(3))
    bias = torch.randn(37, 37)
    bias[3, :] = float("-inf")                  # an additive mask can kill a row too
    compare(q, k, v, attn_mask=bias)


DECODE_CASES = {
    "single_token_gqa": (dict(B=2, Hq=4, Hkv=2, Lq=1, Lk=37),
                         dict(is_causal=True, causal_alignment="bottom_right")),
    "chunk_window_keylen": (dict(B=2, Hq=2, Hkv=1, Lq=3, Lk=37),
                            dict(is_causal=True, causal_alignment="bottom_right", window=9,
                                 key_lengths=torch.tensor([37, 11]))),
    "bool_mask": (dict(B=1, Hq=2, Hkv=2, Lq=2, Lk=37), dict(mask="bool")),
}


@pytest.mark.parametrize("case", list(DECODE_CASES))
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_kernel(case, splits):
    shape, kw = DECODE_CASES[case]
    q, k, v = (t.detach() for t in qkv(**shape))
    kw = dict(kw)
    mask = None
    if kw.pop("mask", None) == "bool":
        mask = torch.rand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]) > 0.5
    kl = kw.get("key_lengths")
    want = ref.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True, **kw)
    got = tattn.attention_decode(q, k, v, mask, kl, kw.get("is_causal", False),
                                 kw.get("causal_alignment") == "bottom_right",
                                 kw.get("window") or 0, 1 / math.sqrt(q.shape[-1]),
                                 num_splits=splits, block_n=16)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.slow
def test_kv_cache_streaming_uses_decode_and_equals_whole_sequence():
    # A 260-token prompt in one causal call vs prefill(256) + 4 single-token decode steps on
    # the triton backend; the steps have Lk ≥ 256 and no grad, so they take the decode kernel.
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 260, 16) for _ in range(3))
    whole = ref.scaled_dot_product_attention(q, k, v, is_causal=True)
    calls = []
    real = tattn.attention_decode
    tattn.attention_decode = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    try:
        with torch.no_grad(), seqkern.use_backend("triton"):
            cache = None
            outs = []
            for s, e in [(0, 256), (256, 257), (257, 258), (258, 259), (259, 260)]:
                o, cache = ref.kv_cache_append(cache, k[:, :, s:e], v[:, :, s:e]), None
                cache = o
                outs.append(seqkern.ops.scaled_dot_product_attention(
                    q[:, :, s:e], cache[0], cache[1], is_causal=True,
                    causal_alignment="bottom_right"))
    finally:
        tattn.attention_decode = real
    assert len(calls) == 4
    torch.testing.assert_close(torch.cat(outs, dim=2), whole, **TOL)


# ---------------------------------------------------------------- dropout, mask gradient -----

DROPOUT_CASES = {
    "causal_gqa": (dict(B=2, Hq=4, Hkv=2, Lq=37, Lk=37), dict(is_causal=True)),
    "window_keylen_bottom_right": (dict(B=2, Hq=2, Hkv=1, Lq=20, Lk=37),
                                   dict(is_causal=True, window=7, causal_alignment="bottom_right",
                                        key_lengths=torch.tensor([37, 12]))),
    "additive_mask_cross": (dict(B=1, Hq=2, Hkv=2, Lq=9, Lk=37, DV=24), dict(mask="additive")),
}


@pytest.mark.parametrize("p", [0.3, 0.8])
@pytest.mark.parametrize("case", list(DROPOUT_CASES))
def test_dropout_equals_the_reference_with_the_cpu_pattern(case, p):
    """The kernels drop exactly the weights ``dropout_keep_mask`` reports for the seed they are
    given (the cpu kernels' pattern), forward and backward."""
    shape, kw = DROPOUT_CASES[case]
    kw = dict(kw)
    q, k, v = qkv(**shape)
    if kw.pop("mask", None) == "additive":
        kw["attn_mask"] = torch.randn(q.shape[2], k.shape[2])
    gqa = q.shape[1] != k.shape[1]
    torch.manual_seed(11)
    with seqkern.use_backend("triton"):
        got = seqkern.ops.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, dropout_p=p,
                                                       **kw)
    torch.manual_seed(11)  # the public op draws its seed from torch's generator
    seed = seqkern.ops.attention._draw_seed()
    keep = seqkern.ops.dropout_keep_mask((q.shape[0], q.shape[1], q.shape[2], k.shape[2]), p,
                                         seed)
    want = ref.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, dropout_p=p,
                                            dropout_mask=keep, **kw)
    torch.testing.assert_close(got, want, **TOL)
    g = torch.randn_like(got)
    for name, a, b in zip("qkv", torch.autograd.grad(got, (q, k, v), g),
                          torch.autograd.grad(want, (q, k, v), g)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"d{name}: {m}")


def test_dropout_same_output_as_the_cpu_backend_and_edge_probabilities():
    q, k, v = (t.detach() for t in qkv(B=1, Hq=2, Hkv=1, Lq=33, Lk=33))
    outs = {}
    for backend in ("triton", "cpu"):
        torch.manual_seed(4)
        with seqkern.use_backend(backend):
            outs[backend] = seqkern.ops.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=0.5, enable_gqa=True)
    torch.testing.assert_close(outs["triton"], outs["cpu"], **TOL)
    with seqkern.use_backend("triton"):
        assert not seqkern.ops.scaled_dot_product_attention(q, k, v, dropout_p=1.0,
                                                            enable_gqa=True).any()
        # without grad and with a long cache the decode kernel is skipped for dropout
        qd, kd, vd = (t.detach() for t in qkv(B=1, Hq=2, Hkv=2, Lq=1, Lk=260, D=16))
        torch.manual_seed(5)
        got = seqkern.ops.scaled_dot_product_attention(qd, kd, vd, dropout_p=0.4)
    torch.manual_seed(5)
    keep = seqkern.ops.dropout_keep_mask((1, 2, 1, 260), 0.4, seqkern.ops.attention._draw_seed())
    torch.testing.assert_close(got, ref.scaled_dot_product_attention(
        qd, kd, vd, dropout_p=0.4, dropout_mask=keep), **TOL)


MASK_GRAD_SHAPES = {
    "full": (2, 2, 20, 37),
    "over_heads": (2, 1, 20, 37),
    "two_dim": (20, 37),
    "key_padding": (2, 1, 1, 37),    # broadcast over heads and queries: rows summed in a tile
    "per_query": (1, 2, 20, 1),      # broadcast over keys: keys summed in a tile
    "scalar": (1,),
}


@pytest.mark.parametrize("shape", list(MASK_GRAD_SHAPES))
def test_additive_mask_gradient(shape):
    """d attn_mask = dS summed over the dims the mask broadcasts along, with causal masking,
    GQA and a fully masked row, as the reference's autograd gives it."""
    q, k, v = qkv(B=2, Hq=2, Hkv=1, Lq=20, Lk=37)
    m = torch.randn(*MASK_GRAD_SHAPES[shape])
    if m.dim() >= 2 and m.shape[-2] == 20 and m.shape[-1] == 37:
        m[..., 3, :] = float("-inf")
    m.requires_grad_()
    kw = dict(attn_mask=m, is_causal=True, causal_alignment="bottom_right", enable_gqa=True)
    with seqkern.use_backend("triton"):
        got = seqkern.ops.scaled_dot_product_attention(q, k, v, **kw)
    want = ref.scaled_dot_product_attention(q, k, v, **kw)
    torch.testing.assert_close(got, want, **TOL)
    g = torch.randn_like(got)
    a = torch.autograd.grad(got, (q, k, v, m), g)
    b = torch.autograd.grad(want, (q, k, v, m), g)
    for name, x, y in zip(["dq", "dk", "dv", "dmask"], a, b):
        assert x.shape == y.shape, name
        torch.testing.assert_close(x, y, atol=5e-5, rtol=5e-5, msg=lambda msg: f"{name}: {msg}")


def test_mask_gradient_with_dropout():
    q, k, v = qkv(B=1, Hq=2, Hkv=2, Lq=17, Lk=17, D=16)
    m = torch.randn(17, 17, requires_grad=True)
    torch.manual_seed(8)
    with seqkern.use_backend("triton"):
        got = seqkern.ops.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=0.25)
    torch.manual_seed(8)
    keep = seqkern.ops.dropout_keep_mask((1, 2, 17, 17), 0.25, seqkern.ops.attention._draw_seed())
    want = ref.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=0.25,
                                            dropout_mask=keep)
    g = torch.randn_like(got)
    for x, y in zip(torch.autograd.grad(got, (q, m), g), torch.autograd.grad(want, (q, m), g)):
        torch.testing.assert_close(x, y, atol=5e-5, rtol=5e-5)


def test_bfloat16_under_the_interpreter_is_refused():
    """The interpreter's tl.dot gets bf16 wrong (triton-lang/triton#11584): a clear error, not
    garbage."""
    q = torch.randn(1, 1, 8, 16).bfloat16()
    with seqkern.use_backend("triton"), pytest.raises(NotImplementedError, match="bfloat16"):
        seqkern.ops.scaled_dot_product_attention(q, q, q)


def test_float64_runs_on_the_reference_with_float64_precision():
    """The Triton kernels accumulate in float32: float64 goes to the reference (exact, and
    gradcheck passes), and the kernels called directly refuse it."""
    q, k, v = (t.double() for t in qkv(Lq=9, Lk=11, D=8))
    kw = dict(is_causal=True, causal_alignment="bottom_right", window=4)
    with seqkern.use_backend("triton"):
        assert seqkern.select("attention", "cpu", torch.float64) == "reference"
        assert seqkern.select("attention", "cpu", torch.float32) == "triton"
        got = seqkern.ops.scaled_dot_product_attention(q, k, v, **kw)
        assert torch.autograd.gradcheck(
            lambda *t: seqkern.ops.scaled_dot_product_attention(*t, **kw), (q, k, v))
    assert torch.equal(got, ref.scaled_dot_product_attention(q, k, v, **kw))
    with pytest.raises(NotImplementedError, match="float64"):
        tattn.attention_forward(q, k, v, None, None, True, True, 4, 0.3)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def test_float16_within_twice_the_reference_error():
    """float16 (fp32 accumulation): forward and gradients against a float64 reference, at most
    about twice the error of the reference computed in float16 itself."""
    torch.manual_seed(0)
    q, k, v = (t.detach() for t in qkv(Hq=4, Hkv=2, Lq=21, Lk=37, D=24))
    kw = dict(is_causal=True, causal_alignment="bottom_right", enable_gqa=True)
    g = torch.randn(1, 4, 21, 24)

    def run(dtype, backend):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        with seqkern.use_backend(backend):
            out = seqkern.ops.scaled_dot_product_attention(*leaves, **kw)
        return [out, *torch.autograd.grad(out, leaves, g.to(dtype))]

    exact = run(torch.float64, "reference")
    half_ref = run(torch.float16, "reference")
    got = run(torch.float16, "triton")
    assert got[0].dtype == torch.float16
    for name, a, r, e in zip(["out", "dq", "dk", "dv"], got, half_ref, exact):
        assert _err(a, e) <= 2 * _err(r, e) + 1e-3, name


@pytest.mark.parametrize("Lq", [1, 9, 40])
def test_additive_minus_inf_keeps_nan_keys_out(Lq):
    """An additive mask's −inf rules a key out even where its K row is NaN (an unwritten cache
    slot): every backend agrees with the cpu kernels (NaN + (−inf) was NaN for every query)."""
    torch.manual_seed(Lq)
    q, k, v = (t.detach() for t in qkv(Lq=Lq, Lk=30))
    k[:, :, 7] = float("nan")
    am = torch.randn(1, 1, Lq, 30)
    am[..., 7] = float("-inf")
    with seqkern.use_backend("triton"):
        got = seqkern.ops.scaled_dot_product_attention(q, k, v, attn_mask=am)
    want = ref.scaled_dot_product_attention(q, k, v, attn_mask=am)
    clean = k.clone()
    clean[:, :, 7] = 0.0
    assert torch.isfinite(got).all() and torch.isfinite(want).all()
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(want, ref.scaled_dot_product_attention(q, clean, v, attn_mask=am), **TOL)
    torch.testing.assert_close(seqkern.ops.scaled_dot_product_attention(q, k, v, attn_mask=am), want, **TOL)


def test_key_lengths_strided_and_past_int32():
    """key_lengths as a strided column of a table, and lengths past 2**31 (all keys): the
    kernels index them unstrided and read int32, so the host makes them contiguous and clamps."""
    q, k, v = qkv(B=3, Lq=9, Lk=12, D=16)
    table = torch.tensor([[12, 0], [2**31, 1], [5, 2]])
    compare(q, k, v, key_lengths=table[:, 0])
    compare(q, k, v, key_lengths=torch.tensor([2**32 + 3, 4, 12]))


def test_no_heads_is_an_empty_result():
    q, k, v = qkv(B=2, Hq=0, Hkv=0, Lq=5, Lk=5, D=8)
    with seqkern.use_backend("triton"):
        out = seqkern.ops.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.shape == (2, 0, 5, 8)
    out.sum().backward()
    assert all(t.grad.shape == t.shape for t in (q, k, v))


def test_double_backward_raises():
    q, k, v = qkv(Lq=5, Lk=5, D=8)
    with seqkern.use_backend("triton"):
        out = seqkern.ops.scaled_dot_product_attention(q, k, v, is_causal=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(out.sum(), q, create_graph=True)
