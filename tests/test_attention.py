"""seqkern.ops.scaled_dot_product_attention on the cpu backend against the float64 reference
(and torch's SDPA as the yardstick for low-precision error): outputs, dq/dk/dv, every mask kind,
GQA, layouts, dtypes, custom-op registration and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import seqkern
from conftest import stable_seed
from seqkern import registry
from seqkern.ops import attention as ops
from seqkern.ops import scaled_dot_product_attention as sdpa
from seqkern.reference import attention as ref

pytestmark = pytest.mark.skipif(not registry.availability("cpu")[0],
                                reason="the C++ extension is not built")

# (B, Hq, Hkv, Lq, Lk, D, Dv): odd sizes, tiles that end mid-block, Lq ≠ Lk both ways,
# GQA ratios 1, 2, 4, 8, value head dim ≠ query head dim, and few query rows (decode path)
SHAPES = [
    (1, 1, 1, 1, 1, 16, 16),
    (2, 2, 1, 7, 7, 40, 40),
    (1, 4, 1, 129, 129, 64, 64),
    (2, 8, 1, 7, 129, 16, 16),
    (1, 2, 2, 129, 7, 128, 128),
    (2, 4, 2, 70, 70, 40, 24),
    (2, 8, 2, 3, 150, 40, 24),  # ≤ 8 query rows: the row-wise decode kernels
    (1, 4, 2, 8, 37, 24, 24),   # 8 rows (bf16 inference with AMX: its few-query tile kernel)
]
MASKS = ["none", "causal", "causal_br", "window", "window_br", "key_lengths", "bool", "additive",
         "bool_2d", "causal+bool+key_lengths", "window+additive", "causal_br+key_lengths",
         "causal_br+bool_padding"]


def make_inputs(shape, dtype, gen, layout="contiguous"):
    B, Hq, Hkv, Lq, Lk, D, Dv = shape
    if layout == "packed":
        # q, k, v as strided slices of one (B, L, ·) projection, as MultiheadAttention makes them
        assert Lq == Lk and D == Dv
        qkv = torch.randn(B, Lq, (Hq + 2 * Hkv) * D, generator=gen, dtype=torch.float64)
        qkv = qkv.to(dtype).view(B, Lq, Hq + 2 * Hkv, D).transpose(1, 2)
        return qkv[:, :Hq], qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]
    q = torch.randn(B, Hq, Lq, D, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, Lk, Dv, generator=gen, dtype=torch.float64).to(dtype)
    if layout == "transposed":  # (B, L, H, D) memory, as a batch_first projection gives
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    return q, k, v


def make_mask_kwargs(kind, B, Hq, Lq, Lk, dtype, gen):
    kw = {}
    parts = kind.split("+")
    if "causal" in parts:
        kw["is_causal"] = True
    if "causal_br" in parts or "window_br" in parts:
        kw.update(is_causal=True, causal_alignment="bottom_right")
    if "window" in parts or "window_br" in parts:
        kw.update(is_causal=True, window=3)
    if "key_lengths" in parts:
        kw["key_lengths"] = torch.randint(0, Lk + 1, (B,), generator=gen)
        kw["key_lengths"][0] = Lk
    if "bool" in parts:
        kw["attn_mask"] = torch.rand(B, Hq, Lq, Lk, generator=gen) > 0.3
    if "bool_padding" in parts:  # (B, 1, 1, Lk): one value down each key's column
        kw["attn_mask"] = torch.rand(B, 1, 1, Lk, generator=gen) > 0.2
    if "bool_2d" in parts:
        kw["attn_mask"] = torch.rand(Lq, Lk, generator=gen) > 0.5
    if "additive" in parts:
        m = torch.randn(B, 1, Lq, Lk, generator=gen, dtype=torch.float64)
        m[torch.rand(B, 1, Lq, Lk, generator=gen) < 0.2] = float("-inf")
        kw["attn_mask"] = m.to(dtype)
    return kw


def make_problem(shape, kind, dtype, gen):
    """q, k, v of `shape` in dtype, the mask keywords of `kind`, and those keywords with their
    float tensors in float64 (for the reference)."""
    B, Hq, Hkv, Lq, Lk, D, Dv = shape
    q, k, v = make_inputs(shape, dtype, gen)
    kw = make_mask_kwargs(kind, B, Hq, Lq, Lk, dtype, gen)
    kw64 = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
            for n, t in kw.items()}
    return q, k, v, kw, kw64


def torch_sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None, window=None,
               key_lengths=None, causal_alignment="top_left", enable_gqa=True):
    """torch's SDPA on the same problem, every mask folded into one; NaN rows (nothing
    allowed) become 0 as in SPEC."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    allowed = ref.allowed_keys(Lq, Lk, is_causal=is_causal, window=window,
                               key_lengths=key_lengths, causal_alignment=causal_alignment)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = allowed & attn_mask
        attn_mask = None
    if attn_mask is None:
        m = allowed
    else:
        m = attn_mask.masked_fill(~allowed, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, m, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1]).nan_to_num(0.0)


def forward_backward(fn, q, k, v, go, keep_nan=False, **kw):
    """[out, dq, dk, dv]; NaN gradients become 0 unless keep_nan (for tests a NaN must fail)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), go.to(out.dtype))
    return [out.detach()] + [g if keep_nan else g.nan_to_num(0.0) for g in grads]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


FLOOR = {torch.float32: 2e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}
AMX = registry.availability("cpu")[0] and seqkern._ext._C.attention_bf16_tiles()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", MASKS)
def test_float64_matches_reference(shape, kind):
    gen = torch.Generator().manual_seed(stable_seed(shape, kind))
    B, Hq, Hkv, Lq, Lk, D, Dv = shape
    q, k, v = make_inputs(shape, torch.float64, gen)
    kw = make_mask_kwargs(kind, B, Hq, Lq, Lk, torch.float64, gen)
    go = torch.randn(B, Hq, Lq, Dv, generator=gen, dtype=torch.float64)
    got = forward_backward(sdpa, q, k, v, go, enable_gqa=True, **kw)
    want = forward_backward(ref.scaled_dot_product_attention, q, k, v, go, enable_gqa=True, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("threads, B, Hq, Hkv", [(1, 1, 5, 1), (2, 1, 9, 1), (2, 1, 10, 2),
                                                 (2, 1, 12, 1), (1, 2, 5, 1), (2, 1, 8, 1)])
@pytest.mark.parametrize("Lq", [16, 3], ids=["tiles", "decode"])
def test_gqa_group_splits_with_empty_chunks(threads, B, Hq, Hkv, Lq):
    """With few (batch, kv head) pairs the backward splits each group of g query heads into
    chunks of ⌈g/chunks⌉, which can leave the last chunks with no head (g = 5 in 4 chunks of 2):
    their dK/dV partial sums are zeros, not uninitialised memory, and the tile kernel, which
    prepares each chunk's heads, once failed there (vector::_M_default_append)."""
    gen = torch.Generator().manual_seed(stable_seed(threads, B, Hq, Hkv, Lq))
    shape = (B, Hq, Hkv, Lq, 40, 8, 8)
    q, k, v = make_inputs(shape, torch.float64, gen)
    go = torch.randn(B, Hq, Lq, 8, generator=gen, dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = forward_backward(sdpa, q, k, v, go, enable_gqa=True, is_causal=True,
                               causal_alignment="bottom_right")
    finally:
        torch.set_num_threads(before)
    want = forward_backward(ref.scaled_dot_product_attention, q, k, v, go, enable_gqa=True,
                            is_causal=True, causal_alignment="bottom_right")
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["none", "causal", "window_br", "causal+bool+key_lengths",
                                  "additive"])
def test_low_precision_within_torch_error(dtype, shape, kind):
    """Error vs a float64 reference at most ~2× torch's own SDPA error in that dtype."""
    gen = torch.Generator().manual_seed(stable_seed(shape, kind, dtype))
    q, k, v, kw, kw64 = make_problem(shape, kind, dtype, gen)
    B, Hq, _, Lq, _, _, Dv = shape
    go = torch.randn(B, Hq, Lq, Dv, generator=gen, dtype=torch.float64).to(dtype)
    exact = forward_backward(ref.scaled_dot_product_attention, q.double(), k.double(),
                             v.double(), go.double(), enable_gqa=True, **kw64)
    ours = forward_backward(sdpa, q, k, v, go, enable_gqa=True, **kw)
    theirs = forward_backward(torch_sdpa, q, k, v, go, **kw)
    for name, a, t, e in zip(("out", "dq", "dk", "dv"), ours, theirs, exact):
        assert a.dtype == dtype
        bound = 2 * max_err(t, e) + FLOOR[dtype] * max(1.0, e.abs().max().item())
        assert max_err(a, e) <= bound, f"{name}: error {max_err(a, e):.3g} > {bound:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 4, 4, 100, 100, 64, 32), (2, 4, 2, 129, 129, 40, 40),
                                   (1, 2, 1, 30, 200, 64, 64)], ids=lambda s: "x".join(map(str, s)))
def test_low_precision_peaked_gradients_without_floor(dtype, shape):
    """Peaked scores make dS = P ⊙ (dP − Δ) a difference of near-equal terms: the backward's
    Δ = rowsum(dO ⊙ O) must use the unrounded output (the forward keeps it in float32 when
    training), or the rounding of O dominates dK (3.9× torch's error at Dv ≠ D, where torch
    computes exactly). Here no error floor: at most 2× torch's own error."""
    gen = torch.Generator().manual_seed(stable_seed(shape, dtype))
    B, Hq, Hkv, Lq, Lk, D, Dv = shape
    q, k, v = make_inputs(shape, torch.float64, gen)
    q, k, v = (4 * q).to(dtype), (2 * k).to(dtype), v.to(dtype)
    go = torch.randn(B, Hq, Lq, Dv, generator=gen, dtype=torch.float64).to(dtype)
    exact = forward_backward(ref.scaled_dot_product_attention, q.double(), k.double(),
                             v.double(), go.double(), enable_gqa=True, is_causal=True)
    ours = forward_backward(sdpa, q, k, v, go, enable_gqa=True, is_causal=True)
    theirs = forward_backward(torch_sdpa, q, k, v, go, is_causal=True)
    for name, a, t, e in zip(("out", "dq", "dk", "dv"), ours, theirs, exact):
        assert a.dtype == dtype
        assert max_err(a, e) <= 2 * max_err(t, e), (
            f"{name}: error {max_err(a, e):.3g} > 2 × torch's {max_err(t, e):.3g}")


@pytest.mark.parametrize("layout", ["packed", "transposed"])
@pytest.mark.parametrize("kind", ["causal", "window", "bool"])
def test_non_contiguous_inputs(layout, kind):
    gen = torch.Generator().manual_seed(5)
    shape = (2, 4, 2, 37, 37, 16, 16)
    q, k, v = make_inputs(shape, torch.float64, gen, layout)
    assert not q.is_contiguous() and not k.is_contiguous()
    kw = make_mask_kwargs(kind, 2, 4, 37, 37, torch.float64, gen)
    go = torch.randn(2, 4, 37, 16, generator=gen, dtype=torch.float64)
    got = forward_backward(sdpa, q, k, v, go, enable_gqa=True, **kw)
    want = forward_backward(ref.scaled_dot_product_attention, q.contiguous(), k.contiguous(),
                            v.contiguous(), go, enable_gqa=True, **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("Lq,Lk,kw", [
    (1000, 1000, dict(is_causal=True)),
    (1000, 1000, dict(is_causal=True, window=100)),
    (64, 1000, dict(is_causal=True, causal_alignment="bottom_right")),
])
def test_long_sequences_float32(Lq, Lk, kw):
    gen = torch.Generator().manual_seed(Lq + Lk)
    shape = (1, 2, 1, Lq, Lk, 64, 64)
    q, k, v = make_inputs(shape, torch.float32, gen)
    go = torch.randn(1, 2, Lq, 64, generator=gen)
    exact = forward_backward(ref.scaled_dot_product_attention, q.double(), k.double(),
                             v.double(), go.double(), enable_gqa=True, **kw)
    ours = forward_backward(sdpa, q, k, v, go, enable_gqa=True, **kw)
    theirs = forward_backward(torch_sdpa, q, k, v, go, **kw)
    for name, a, t, e in zip(("out", "dq", "dk", "dv"), ours, theirs, exact):
        bound = 2 * max_err(t, e) + 2e-6 * max(1.0, e.abs().max().item())
        assert max_err(a, e) <= bound, f"{name}: error {max_err(a, e):.3g} > {bound:.3g}"


@pytest.mark.parametrize("Lq,Lk", [(5, 5), (3, 9), (9, 3)])
def test_drop_in_for_torch_including_top_left_causal(Lq, Lk):
    """Same call, same answer as torch (its causal mask is top-left aligned when Lq ≠ Lk)."""
    gen = torch.Generator().manual_seed(Lq * 10 + Lk)
    q, k, v = make_inputs((2, 3, 3, Lq, Lk, 16, 16), torch.float64, gen)
    for kw in (dict(), dict(is_causal=True), dict(scale=0.1), dict(attn_mask=torch.randn(Lq, Lk, dtype=torch.float64))):
        torch.testing.assert_close(sdpa(q, k, v, **kw), F.scaled_dot_product_attention(q, k, v, **kw),
                                   atol=1e-10, rtol=1e-10)
    # 3-D (B, L, D) inputs, as torch accepts
    torch.testing.assert_close(sdpa(q[:, 0], k[:, 0], v[:, 0], is_causal=True),
                               F.scaled_dot_product_attention(q[:, 0], k[:, 0], v[:, 0], is_causal=True),
                               atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("Lq,Lk", [(10, 0), (2, 0), (0, 10)])
def test_empty_sequences(dtype, Lq, Lk):
    """No keys: every query sees nothing and gets zeros (no crash, no NaN); no queries: empty."""
    q = torch.randn(2, 4, Lq, 16, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 2, Lk, 16, dtype=dtype, requires_grad=True) for _ in range(2))
    out = sdpa(q, k, v, enable_gqa=True)
    assert out.shape == (2, 4, Lq, 16) and not out.any()
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and not t.grad.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("Lq", [1, 9])
def test_no_heads_is_an_empty_result(dtype, Lq):
    """q, k, v with zero heads give an empty output, as torch's (not an error)."""
    q, k, v = (torch.randn(2, 0, Lq, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    out = sdpa(q, k, v, is_causal=True)
    assert out.shape == F.scaled_dot_product_attention(q, k, v, is_causal=True).shape
    out.sum().backward()
    assert all(t.grad.shape == t.shape for t in (q, k, v))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        sdpa(torch.randn(2, 2, Lq, 8), torch.randn(2, 0, Lq, 8), torch.randn(2, 0, Lq, 8),
             enable_gqa=True)


def test_vmap_over_key_lengths_matches_a_loop():
    """key_lengths batched by vmap: no data-dependent check on it (the reference runs there)."""
    q, k, v = make_inputs((2, 2, 2, 3, 7, 8, 8), torch.float32, torch.Generator().manual_seed(3))
    lens = torch.tensor([[7, 2], [0, 5], [3, 3]])
    got = torch.func.vmap(lambda kl: sdpa(q, k, v, key_lengths=kl))(lens)
    for i in range(lens.shape[0]):
        torch.testing.assert_close(got[i], sdpa(q, k, v, key_lengths=lens[i]))


@pytest.mark.parametrize("Lq", [9, 3], ids=["tiles", "decode"])
def test_fully_masked_rows_give_zeros_and_finite_grads(Lq):
    gen = torch.Generator().manual_seed(1)
    L, r = 9, Lq // 2  # r: the row masked out entirely
    q, k, v = make_inputs((2, 2, 2, Lq, L, 16, 16), torch.float32, gen)
    m = torch.ones(2, 2, Lq, L, dtype=torch.bool)
    m[0, 1, r] = False
    lengths = torch.tensor([L, 0])  # batch 1: no keys at all
    for kw in (dict(attn_mask=m), dict(key_lengths=lengths),
               dict(attn_mask=torch.full((Lq, L), float("-inf")).triu(1)),
               dict(is_causal=True, causal_alignment="bottom_right")):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        short = "causal_alignment" in kw and Lq > 5  # Lk < Lq: the first rows see no key
        out = sdpa(qq, kk[:, :, :5] if short else kk, vv[:, :, :5] if short else vv, **kw)
        out.sum().backward()
        for t in (out, qq.grad, kk.grad, vv.grad):
            assert torch.isfinite(t).all()
    out = sdpa(q, k, v, attn_mask=m)
    assert torch.all(out[0, 1, r] == 0)
    out = sdpa(q, k, v, key_lengths=lengths)
    assert torch.all(out[1] == 0) and torch.all(out[0] != 0)
    if Lq > 5:
        out = sdpa(q, k[:, :, :5], v[:, :, :5], is_causal=True, causal_alignment="bottom_right")
        assert torch.all(out[:, :, :4] == 0) and torch.all(out[:, :, 4:] != 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("Lq,Lk", [(1, 5), (3, 17), (2, 16), (9, 37)])
@pytest.mark.parametrize("fill", ["-100", "finfo.min"])
def test_rows_of_large_negative_additive_masks(dtype, Lq, Lk, fill):
    """Rows behind a large negative additive mask (a padding-mask style): every key of batch 0's
    rows, half the keys of batch 1's. Gradients stay finite (exp(-lse) must not leak into unused
    vector lanes) and right. With finfo.min on every key the mask absorbs the scores and lse
    absorbs log(sum): recomputing the weights from lse gives 1 each instead of 1/Lk, in torch's
    flash kernel as in ours (torch's dq there is Lk times the float64 reference's), so those
    rows are only required to be finite."""
    gen = torch.Generator().manual_seed(stable_seed(dtype, Lq, Lk, fill))
    q, k, v = make_inputs((2, 2, 2, Lq, Lk, 16, 8), dtype, gen)
    go = torch.randn(2, 2, Lq, 8, generator=gen, dtype=dtype)
    value = -100.0 if fill == "-100" else torch.finfo(dtype).min
    mask = torch.zeros(2, 1, Lq, Lk, dtype=dtype)
    mask[0] = value  # batch 0: every key of every row
    mask[1, :, :, Lk // 2:] = value  # batch 1: half of the keys
    ours = forward_backward(sdpa, q, k, v, go, keep_nan=True, attn_mask=mask)
    exact = forward_backward(ref.scaled_dot_product_attention, q.double(), k.double(),
                             v.double(), go.double(), attn_mask=mask.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for name, a, e in zip(("out", "dq", "dk", "dv"), ours, exact):
        assert torch.isfinite(a).all(), name
        if fill == "finfo.min" and name != "out":
            a, e = a[1], e[1]
        torch.testing.assert_close(a.double(), e, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("kind", ["causal", "causal_br", "window", "bool", "additive",
                                  "key_lengths"])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (4, 1)])
@pytest.mark.parametrize("Lq", [9, 3, 7], ids=["tiles", "decode", "decode7"])
def test_gradcheck_float64(kind, Hq, Hkv, Lq):
    gen = torch.Generator().manual_seed(Hq + Hkv)
    shape = (2, Hq, Hkv, Lq, 8, 8, 4)
    q, k, v = make_inputs(shape, torch.float64, gen)
    kw = make_mask_kwargs(kind, 2, Hq, Lq, 8, torch.float64, gen)
    fn = lambda q, k, v: sdpa(q, k, v, enable_gqa=True, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (q, k, v)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["none", "causal+bool+key_lengths", "window_br", "additive",
                                  "additive+dropout", "causal+dropout"])
@pytest.mark.parametrize("Lq", [9, 6, 3], ids=["tiles", "few", "decode"])
@pytest.mark.parametrize("out_fp32", [False, True], ids=["out", "out_fp32"])
def test_opcheck(dtype, kind, Lq, out_fp32):
    gen = torch.Generator().manual_seed(0)
    q, k, v = make_inputs((2, 4, 2, Lq, 11, 16, 8), dtype, gen)
    kw = make_mask_kwargs(kind.replace("+dropout", ""), 2, 4, Lq, 11, dtype, gen)
    p, seed = (0.3, torch.tensor([12345])) if "dropout" in kind else (0.0, None)
    args = (q, k, v, kw.get("attn_mask"), kw.get("key_lengths"), kw.get("is_causal", False),
            kw.get("causal_alignment") == "bottom_right", kw.get("window", 0), 0.25, p, seed,
            out_fp32)
    torch.library.opcheck(ops._attention_forward_op, args)
    out, lse = ops._attention_forward_op(*args)
    reduced = dtype in (torch.bfloat16, torch.float16)
    assert out.dtype == (torch.float32 if out_fp32 and reduced else dtype)
    go = torch.randn(out.shape, generator=gen).to(dtype).to(out.dtype)
    mask_grad = kw.get("attn_mask") is not None and kw["attn_mask"].is_floating_point()
    torch.library.opcheck(ops._attention_backward_op,
                          (go, q, k, v, out, lse) + args[3:-1] + (mask_grad,))


def test_backward_fake_matches_the_kernel_for_strided_inputs():
    """The backward op's fake returns contiguous gradients, as the kernel does: q, k, v that are
    views of a transposed projection (CausalSelfAttention's) compiled with a wrong-stride fake."""
    q = torch.randn(2, 12, 8, 4).transpose(1, 2)
    k, v = torch.randn(2, 8, 12, 4), torch.randn(2, 8, 12, 4)
    out, lse = ops._attention_forward_op(q, k, v, None, None, True, False, 0, 0.5, 0.0,
                                         None)
    torch.library.opcheck(ops._attention_backward_op,
                          (torch.randn_like(out), q, k, v, out, lse, None, None, True, False, 0,
                           0.5, 0.0, None, False))


def test_inference_mode_mask_and_key_lengths_in_a_training_call():
    """A mask built under inference_mode (e.g. cached once at startup) works in training, as
    with torch's SDPA."""
    with torch.inference_mode():
        mask = torch.ones(3, 3, dtype=torch.bool).tril()
        kl = torch.tensor([3])
    q = torch.randn(1, 2, 3, 4, requires_grad=True)
    sdpa(q, q, q, mask, key_lengths=kl).sum().backward()
    assert torch.isfinite(q.grad).all()


def test_double_backward_raises():
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64, requires_grad=True)
    out = sdpa(q, q, q, is_causal=True)
    # create_graph=True runs the backward with grad mode on, which is where it must refuse
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), q, create_graph=True)
    (g,) = torch.autograd.grad(sdpa(q, q, q, is_causal=True).sum(), q)
    assert torch.isfinite(g).all()


def test_cpu_and_reference_backends_agree():
    gen = torch.Generator().manual_seed(2)
    q, k, v = make_inputs((2, 4, 2, 20, 20, 16, 16), torch.float64, gen)
    assert registry.select("attention", "cpu") == "cpu"
    a = sdpa(q, k, v, is_causal=True, enable_gqa=True, window=5)
    with seqkern.use_backend("reference"):
        assert registry.select("attention", "cpu") == "reference"
        b = sdpa(q, k, v, is_causal=True, enable_gqa=True, window=5)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("B,Hkv,g", [(1, 1, 8), (4, 4, 2), (1, 2, 4)])
def test_grouped_backward_split_and_thread_count_agree(B, Hkv, g):
    """The backward splits a query group across tasks when there are few (batch, kv-head)
    pairs; the split and the thread count must not change the result."""
    gen = torch.Generator().manual_seed(B * 100 + Hkv * 10 + g)
    shape = (B, Hkv * g, Hkv, 33, 33, 16, 16)
    q, k, v = make_inputs(shape, torch.float64, gen)
    go = torch.randn(B, Hkv * g, 33, 16, generator=gen, dtype=torch.float64)
    want = forward_backward(ref.scaled_dot_product_attention, q, k, v, go, is_causal=True,
                            enable_gqa=True)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            got = forward_backward(sdpa, q, k, v, go, is_causal=True, enable_gqa=True)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("Lq", [2, 3, 6])
@pytest.mark.parametrize("window", [None, 5])
def test_few_query_forward_is_bitwise_independent_of_threads(dtype, Lq, window):
    """With fewer (batch, head) pairs than threads the decode forward gives each thread one row;
    the keys are still summed in the same chunks, and rows that share a bf16 key's load (pairs
    with the same first key) sum in the one-row order, so the output does not change by an ulp.
    A window gives every row a different first key: those are never paired."""
    gen = torch.Generator().manual_seed(Lq)
    q, k, v = (torch.randn(1, 1, n, 64, generator=gen).to(dtype) for n in (Lq, 300, 300))
    kw = dict(is_causal=True, causal_alignment="bottom_right", window=window)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(sdpa(q, k, v, **kw))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    exact = ref.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kw)
    theirs = ref.scaled_dot_product_attention(q, k, v, **kw)
    assert max_err(outs[0], exact) <= 2 * max_err(theirs, exact) + FLOOR[dtype]


@pytest.mark.parametrize("chunks", [[1] * 10, [4, 1, 5], [10]])
@pytest.mark.parametrize("window", [None, 4])
def test_decode_with_cache_equals_full(chunks, window):
    gen = torch.Generator().manual_seed(9)
    q, k, v = make_inputs((2, 8, 2, 10, 10, 16, 16), torch.float32, gen)
    full = sdpa(q, k, v, is_causal=True, enable_gqa=True, window=window)
    outs, t = [], 0
    for n in chunks:
        outs.append(sdpa(q[:, :, t:t + n], k[:, :, :t + n], v[:, :, :t + n], is_causal=True,
                         enable_gqa=True, window=window, causal_alignment="bottom_right"))
        t += n
    torch.testing.assert_close(torch.cat(outs, dim=2), full, atol=2e-6, rtol=2e-6)


@pytest.mark.skipif(not AMX, reason="bf16 tiles (AMX or AVX512_BF16) not available")
@pytest.mark.parametrize("D,Dv", [(64, 64), (40, 72), (128, 128)])
@pytest.mark.parametrize("kw", [dict(is_causal=True, causal_alignment="bottom_right"),
                                dict(is_causal=True, window=37), dict(mask="bool")],
                         ids=["causal_br", "window", "bool_mask"])
def test_bf16_tiles_pack_per_head_as_up_front(D, Dv, kw):
    """The bf16 tile forward packs K and V per (batch, kv head) inside its tasks when there are
    enough pairs to go round the threads, else all of them up front: the batch in one call (the
    first way, with 2 threads) and batch element by batch element (the second) give the same
    bits, with key lengths that end mid-block and NaN in the cache past them."""
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(stable_seed(D, Dv, str(kw)))
    B, Hq, Hkv, L = 4, 4, 2, 300
    q, k, v = make_inputs((B, Hq, Hkv, L, L, D, Dv), torch.bfloat16, gen)
    lengths = torch.tensor([300, 150, 77, 1])
    for b, n in enumerate(lengths.tolist()):
        k[b, :, n:], v[b, :, n:] = float("nan"), float("nan")
    kw = dict(kw)
    if kw.pop("mask", None):
        kw["attn_mask"] = torch.rand(B, 1, L, L, generator=gen) > 0.3
    with torch.no_grad():
        whole = sdpa(q, k, v, enable_gqa=True, key_lengths=lengths, **kw)
        parts = [sdpa(q[b:b + 1], k[b:b + 1], v[b:b + 1], enable_gqa=True, key_lengths=lengths[b:b + 1],
                      **{n: (t[b:b + 1] if isinstance(t, torch.Tensor) else t) for n, t in kw.items()})
                 for b in range(B)]
    torch.testing.assert_close(whole, torch.cat(parts), atol=0, rtol=0, equal_nan=True)
    assert torch.isfinite(whole[lengths > 1]).all()


@pytest.mark.skipif(not AMX, reason="bf16 tiles (AMX or AVX512_BF16) not available")
@pytest.mark.parametrize("D,Dv", [(64, 64), (40, 72)])
@pytest.mark.parametrize("kw", [dict(is_causal=True, causal_alignment="bottom_right"),
                                dict(is_causal=True, window=37)], ids=["causal_br", "window"])
def test_bf16_tiles_backward_pack_per_pair_as_up_front(D, Dv, kw):
    """The bf16 tile backward, too, packs K, V, Q and dO per (batch, kv head) inside its tasks
    where there are enough pairs (here the batch in one call, 2 threads), else up front (element
    by element): the same bits for dq, dk, dv, with key lengths ending mid-block."""
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(stable_seed(D, Dv, str(kw), "backward"))
    B, H, L = 4, 2, 300
    q, k, v = make_inputs((B, H, H, L, L, D, Dv), torch.bfloat16, gen)
    go = torch.randn(B, H, L, Dv, generator=gen).to(torch.bfloat16)
    lengths = torch.tensor([300, 150, 77, 2])

    def grads(b0, b1):
        leaves = [t[b0:b1].clone().requires_grad_(True) for t in (q, k, v)]
        out = sdpa(*leaves, key_lengths=lengths[b0:b1], **kw)
        return torch.autograd.grad(out, leaves, go[b0:b1])

    whole = grads(0, B)
    parts = [grads(b, b + 1) for b in range(B)]
    for w, p in zip(whole, zip(*parts)):
        torch.testing.assert_close(w, torch.cat(p), atol=0, rtol=0)


@pytest.mark.parametrize("slope", [0.4, 0.02, -0.4])
@pytest.mark.parametrize("kind", ["causal", "window_br", "additive"])
def test_bf16_scores_that_grow_along_the_keys(slope, kind):
    """The bf16 tile kernel takes exponents against a reference max that moves only when a key
    tile's max exceeds it by more than 8 (and then redoes that tile): scores rising along the
    keys (by ~100 per 256-key tile, or slowly) and falling, against float64 and torch's error."""
    gen = torch.Generator().manual_seed(stable_seed(slope, kind))
    B, H, L, D = 1, 2, 600, 64
    u = torch.ones(D, dtype=torch.float64)
    q = u + 0.3 * torch.randn(B, H, L, D, generator=gen, dtype=torch.float64)
    ramp = slope * torch.arange(L, dtype=torch.float64).view(1, 1, L, 1) / 8
    k = ramp * u + torch.randn(B, H, L, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, H, L, D, generator=gen, dtype=torch.float64)
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    kw = make_mask_kwargs(kind, B, H, L, L, torch.bfloat16, gen)
    kw64 = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
            for n, t in kw.items()}
    go = torch.randn(B, H, L, D, generator=gen, dtype=torch.float64).to(torch.bfloat16)
    exact = forward_backward(ref.scaled_dot_product_attention, q.double(), k.double(),
                             v.double(), go.double(), **kw64)
    ours = forward_backward(sdpa, q, k, v, go, **kw)
    theirs = forward_backward(torch_sdpa, q, k, v, go, **kw)
    for name, a, t, e in zip(("out", "dq", "dk", "dv"), ours, theirs, exact):
        assert torch.isfinite(a).all(), name
        bound = 2 * max_err(t, e) + FLOOR[torch.bfloat16] * max(1.0, e.abs().max().item())
        assert max_err(a, e) <= bound, f"{name}: error {max_err(a, e):.3g} > {bound:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("Lq, Lk", [(300, 300), (16, 700), (5, 700), (1, 700), (3, 129)],
                         ids=["self", "rows", "few_rows", "decode", "decode_rows"])
@pytest.mark.parametrize("kind", ["causal", "none"])
def test_peaked_scores_underflow_to_zero_weights(dtype, Lq, Lk, kind):
    """Scaled scores spread over ±40 and more: many weights fall below 2^-125 of their row's
    largest, where the kernels' base-2 exp returns exact zeros instead of subnormals; the rest as
    the float64 reference within 2x torch's error, and no NaN; gradients too. With few queries
    torch's backward is more accurate than its flash kernel's, and so must ours be: at Lq <= 4
    the decode backward recomputes the decode forward's very scores and sums Δ from the weights;
    in bf16 below 16 queries the forward's P·V takes P as a bf16 hi + lo pair (with P rounded
    to bf16 alone, dS = P(dP - Δ) kept that rounding in peaked rows: dk 4x torch's at Lq = 5)."""
    gen = torch.Generator().manual_seed(stable_seed(dtype, Lq, Lk, kind))
    B, H, D = 2, 3, 64
    q = 12 * torch.randn(B, H, Lq, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, H, Lk, D, generator=gen, dtype=torch.float64) for _ in range(2))
    q, k, v = (t.to(dtype) for t in (q, k, v))
    causal = kind == "causal" and Lq == Lk
    go = torch.randn(B, H, Lq, D, generator=gen, dtype=torch.float64).to(dtype)
    exact = forward_backward(ref.scaled_dot_product_attention, q.double(), k.double(),
                             v.double(), go.double(), is_causal=causal)
    ours = forward_backward(sdpa, q, k, v, go, is_causal=causal)
    theirs = forward_backward(torch_sdpa, q, k, v, go, is_causal=causal)
    for name, a, t, e in zip(("out", "dq", "dk", "dv"), ours, theirs, exact):
        assert torch.isfinite(a).all(), name
        bound = 2 * max_err(t, e) + FLOOR[dtype] * max(1.0, e.abs().max().item())
        assert max_err(a, e) <= bound, f"{name}: error {max_err(a, e):.3g} > {bound:.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("Lq, Lk", [(200, 200), (2, 500), (1, 7), (4, 64), (8, 139)],
                         ids=["self", "decode", "decode_few_keys", "decode_4", "decode_8"])
def test_nan_query_gives_nan_in_its_row_only(dtype, Lq, Lk):
    """A NaN in one query makes its scores NaN: its output row is NaN, as in torch's math path,
    and the other rows are untouched (the exp keeps NaN rather than clamping it to a weight of
    0); its gradients are NaN too. The decode kernels (≤ 8 queries) once dropped a NaN score
    from the row maximum where they take keys one at a time (float64, and float32 with fewer
    than 16 keys), which gave the row zeros."""
    gen = torch.Generator().manual_seed(stable_seed(dtype, Lq, Lk))
    q, k, v = (torch.randn(1, 2, n, 32, generator=gen).to(dtype) for n in (Lq, Lk, Lk))
    q[0, 1, Lq // 2, 5] = float("nan")
    q.requires_grad_()
    k.requires_grad_()
    out = sdpa(q, k, v)
    assert torch.isnan(out[0, 1, Lq // 2]).all()
    out.sum().backward()
    assert torch.isnan(q.grad[0, 1, Lq // 2]).all() and torch.isnan(k.grad[0, 1]).any()
    assert torch.isfinite(q.grad[0, 0]).all() and torch.isfinite(k.grad[0, 0]).all()
    out = out.detach()
    rest = torch.ones(Lq, dtype=torch.bool)
    rest[Lq // 2] = False
    assert torch.isfinite(out[0, 0]).all() and torch.isfinite(out[0, 1, rest]).all()
    torch.testing.assert_close(out[0, 1, rest], F.scaled_dot_product_attention(q, k, v)[0, 1, rest],
                               atol={torch.bfloat16: 2e-2, torch.float16: 3e-3}.get(dtype, 1e-5),
                               rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("Lk, D, Dv", [(16, 16, 16), (47, 40, 24), (1001, 64, 64),
                                       (333, 200, 256), (100, 8, 130), (40, 288, 32)])
@pytest.mark.parametrize("Lq", [1, 3, 8])
@pytest.mark.parametrize("B,Hq,Hkv", [(2, 4, 2), (1, 1, 1)], ids=["heads", "one_head"])
def test_decode_rows_within_torch_error(dtype, Lk, D, Dv, Lq, B, Hq, Hkv):
    """The decode kernels (≤ 8 query rows; bf16 with AMX ≤ 4) score keys 16 at a time and keep P·V in registers,
    in blocks of 8 vectors: key counts around and past 16, head dims with partial vectors and
    value dims over 128, fp32 and a bf16 cache (scored with vdpbf16ps where the CPU has it, up
    to D = 256; D = 288 widens the keys instead), outputs and gradients against float64 and
    torch's own error. With one (batch, head) pair, fewer than the threads, a task is one row
    rather than all of them."""
    gen = torch.Generator().manual_seed(stable_seed(Lk, D, Dv, Lq, dtype, B))
    q, k, v = make_inputs((B, Hq, Hkv, Lq, Lk, D, Dv), dtype, gen)
    go = torch.randn(B, Hq, Lq, Dv, generator=gen).to(dtype)
    kw = dict(is_causal=True, causal_alignment="bottom_right")
    ours = forward_backward(sdpa, q, k, v, go, enable_gqa=True, **kw)
    exact = forward_backward(ref.scaled_dot_product_attention, q.double(), k.double(),
                             v.double(), go.double(), enable_gqa=True, **kw)
    theirs = forward_backward(torch_sdpa, q, k, v, go, **kw)
    assert ours[0].dtype == dtype
    for name, a, t, e in zip(("out", "dq", "dk", "dv"), ours, theirs, exact):
        bound = 2 * max_err(t, e) + FLOOR[dtype] * max(1.0, e.abs().max().item())
        assert max_err(a, e) <= bound, f"{name}: error {max_err(a, e):.3g} > {bound:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["bool", "bool_key_strided", "additive"])
@pytest.mark.parametrize("Lq", [1, 2, 5, 8])
def test_decode_rows_with_explicit_mask_within_torch_error(dtype, kind, Lq):
    """Under an explicit mask the decode kernels also score 16 keys at a time and mask the block
    (a bool mask read with any key stride, an additive one with −inf entries), and P·V sums only
    the keys of non-zero weight: outputs and gradients against float64 and torch's own error;
    and with one (batch, head) pair, fewer than the threads, each row is its own task and the
    output must not change by an ulp with the thread count."""
    gen = torch.Generator().manual_seed(stable_seed(dtype, kind, Lq))
    B, Hq, Hkv, Lk, D, Dv = 2, 4, 2, 203, 64, 48
    q, k, v = make_inputs((B, Hq, Hkv, Lq, Lk, D, Dv), dtype, gen)
    go = torch.randn(B, Hq, Lq, Dv, generator=gen).to(dtype)
    if kind == "additive":
        mask = torch.randn(B, 1, Lq, Lk, generator=gen, dtype=torch.float64)
        mask[..., 3::7] = float("-inf")
    else:
        allowed = torch.rand(B, 1, Lk, Lq, generator=gen) > 0.3
        allowed[..., 5, :] = True  # every row sees some key
        mask = allowed.transpose(-1, -2) if kind == "bool_key_strided" else allowed.transpose(-1, -2).contiguous()

    def masked(m):
        return m if m.dtype == torch.bool else m.to(dtype)
    ours = forward_backward(sdpa, q, k, v, go, enable_gqa=True, attn_mask=masked(mask))
    exact = forward_backward(ref.scaled_dot_product_attention, q.double(), k.double(), v.double(),
                             go.double(), enable_gqa=True, attn_mask=mask)
    theirs = forward_backward(torch_sdpa, q, k, v, go, attn_mask=masked(mask))
    for name, a, t, e in zip(("out", "dq", "dk", "dv"), ours, theirs, exact):
        bound = 2 * max_err(t, e) + FLOOR[dtype] * max(1.0, e.abs().max().item())
        assert max_err(a, e) <= bound, f"{name}: error {max_err(a, e):.3g} > {bound:.3g}"
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.no_grad():
                outs.append(sdpa(q[:1, :1], k[:1, :1], v[:1, :1], attn_mask=masked(mask[:1])))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


def garbage_tolerance(dtype):
    """With a mask the decode kernels may sum the kept keys' V rows in another order than
    without one, so bf16 results may differ in their last digit."""
    return dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1.6e-2)


def cache_with_garbage(k, v, n, how):
    """k, v with NaN / inf past key n, and the mask (`how`: bool or key_lengths) that rules
    those keys out."""
    kc, vc = k.clone(), v.clone()
    kc[:, :, n:], vc[:, :, n:] = float("nan"), float("inf")
    Lk = k.shape[2]
    if how == "bool":
        return kc, vc, dict(attn_mask=(torch.arange(Lk) < n).view(1, 1, 1, Lk))
    return kc, vc, dict(key_lengths=torch.full((k.shape[0],), n))


@pytest.mark.parametrize("Lq", [2, 4, 8])
@pytest.mark.parametrize("how", ["mask", "key_lengths"])
def test_decode_backward_row_without_keys_beside_rows_that_start_late(Lq, how):
    """A row left without keys (by the mask, or by key_lengths with bottom-right alignment),
    beside rows whose keys start past 0 (a window): the decode backward fills its per-row
    buffers over the rows' union of keys, and an empty row once made that fill run backwards,
    off the buffer (a segfault)."""
    gen = torch.Generator().manual_seed(Lq)
    q, k, v = make_inputs((1, 2, 2, Lq, 40, 16, 16), torch.float64, gen)
    kw = dict(is_causal=True, window=20, causal_alignment="bottom_right")
    if how == "mask":
        kw["attn_mask"] = torch.zeros(1, 1, Lq, 40, dtype=torch.bool)
        kw["attn_mask"][..., 1:, 10:30] = True  # row 0 may see nothing
    else:  # row i's window starts at key 21 − Lq + i: the last row's, at 20, is past the length
        kw["key_lengths"] = torch.tensor([20])
    go = torch.randn(1, 2, Lq, 16, generator=gen, dtype=torch.float64)
    got = forward_backward(sdpa, q, k, v, go, **kw)
    want = forward_backward(ref.scaled_dot_product_attention, q, k, v, go, **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("Lq", [3, 5, 8, 9, 16, 32, 40, 100])
def test_garbage_reaches_only_the_queries_that_weight_it(dtype, Lq):
    """Inference with a per-query bool mask over a cache whose slot 150 holds NaN in V and
    slot 170 inf: the queries the mask lets see a slot get NaN or inf there, the others exactly
    what they get with a clean cache (torch's give NaN everywhere). Up to 8 queries on the
    row-wise kernels, which skip keys of weight 0; the tile kernels take such V rows out of the
    product and add them only to the queries that weight them (from 9 queries, once a query
    block's output came out non-finite)."""
    gen = torch.Generator().manual_seed(stable_seed(dtype, Lq))
    q, k, v = make_inputs((1, 2, 2, Lq, 300, 64, 64), dtype, gen)
    vc = v.clone()
    vc[:, :, 150], vc[:, :, 170] = float("nan"), float("inf")
    allowed = torch.rand(1, 2, Lq, 300, generator=gen) > 0.3
    allowed[:, :, :, 150] = torch.arange(Lq) % 2 == 0  # even queries see the NaN slot
    allowed[:, :, :, 170] = torch.arange(Lq) % 3 == 0
    with torch.no_grad():
        got = sdpa(q, k, vc, attn_mask=allowed)
        want = sdpa(q, k, v, attn_mask=allowed)
    sees = allowed[:, :, :, 150] | allowed[:, :, :, 170]  # (1, 2, Lq)
    assert not torch.isfinite(got[sees]).any()
    torch.testing.assert_close(got[~sees], want[~sees], **garbage_tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("Lq,where", [(Lq, "k") for Lq in (1, 6, 12, 40, 100)] + [(1, "v"), (6, "v")])
def test_additive_minus_inf_keeps_garbage_out(dtype, Lq, where):
    """A slot an additive mask rules out with −inf for every query, its K (or V) row NaN: the
    outputs and gradients equal those with a clean cache (a NaN score plus −inf was NaN, and
    made every row NaN; the tile kernels' dS·K and P·V took 0·NaN before they set such rows
    aside)."""
    gen = torch.Generator().manual_seed(stable_seed(dtype, Lq, where, "additive"))
    q, k, v = make_inputs((1, 2, 2, Lq, 50, 64, 64), dtype, gen)
    kc, vc = k.clone(), v.clone()
    (kc if where == "k" else vc)[:, :, 7] = float("nan")
    am = torch.randn(1, 1, Lq, 50, generator=gen).to(dtype)
    am[..., 7] = float("-inf")
    go = torch.randn(1, 2, Lq, 64, generator=gen).to(dtype)
    got = forward_backward(sdpa, q, kc, vc, go, keep_nan=True, attn_mask=am)
    want = forward_backward(sdpa, q, k, v, go, keep_nan=True, attn_mask=am)
    for a, b in zip(got, want):
        if a is got[2]:  # dk: the excluded slot's gradient is 0 either way
            a, b = a[:, :, torch.arange(50) != 7], b[:, :, torch.arange(50) != 7]
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **garbage_tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("Lq", [2, 5, 8, 12, 40, 100])
@pytest.mark.parametrize("where", ["k", "v"])
def test_training_garbage_reaches_only_the_queries_that_see_it(dtype, Lq, where):
    """Training, bottom-right causal against a cache whose newest slot holds NaN in K or V: only
    the last query sees it. The other queries' outputs and gradients (dq) equal those with a clean
    cache in every dtype (bf16 on bf16 tiles once took dS = 0 times the NaN K row into every
    query's dq at 5-8 queries; the tile kernels from 9 queries, until they set such rows aside)."""
    gen = torch.Generator().manual_seed(stable_seed(dtype, Lq, where))
    q, k, v = make_inputs((1, 2, 2, Lq, 100, 64, 64), dtype, gen)
    kc, vc = k.clone(), v.clone()
    (kc if where == "k" else vc)[:, :, -1] = float("nan")
    go = torch.randn(1, 2, Lq, 64, generator=gen).to(dtype)
    go[:, :, -1] = 0  # the loss leaves out the query that sees the slot
    kw = dict(is_causal=True, causal_alignment="bottom_right")
    got = forward_backward(sdpa, q, kc, vc, go, keep_nan=True, **kw)
    want = forward_backward(sdpa, q, k, v, go, keep_nan=True, **kw)
    for a, b in zip(got[:2], want[:2]):  # out, dq
        assert torch.isfinite(a[:, :, :-1]).all()
        torch.testing.assert_close(a[:, :, :-1], b[:, :, :-1], **garbage_tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("how", ["bool", "key_lengths"])
@pytest.mark.parametrize("Lq", [1, 6, 8])
def test_decode_ignores_masked_garbage_in_the_cache(dtype, how, Lq):
    """A preallocated cache may hold NaN or inf past the tokens written so far; a key ruled out
    by the mask must not reach the output, whatever the cache holds there (also with several
    rows, whose bf16 key chunks are widened once for all of them)."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = make_inputs((1, 2, 2, Lq, 300, 64, 64), dtype, gen)
    n = 161
    kc, vc, kw = cache_with_garbage(k, v, n, how)
    with torch.no_grad():
        got = sdpa(q, kc, vc, **kw)
        want = sdpa(q, k[:, :, :n], v[:, :, :n])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, **garbage_tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("how", ["bool", "key_lengths"])
@pytest.mark.parametrize("Lq", [3, 6, 8])
def test_decode_backward_ignores_masked_garbage_in_the_cache(dtype, how, Lq):
    """The backward of a few-row step over a cache with NaN/inf past the valid keys: gradients
    equal those over the valid keys alone, and are exactly zero on the masked keys (up to 8
    rows with any mask kind; bf16 training at 5–8 rows must stay off the tiles)."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = make_inputs((2, 4, 2, Lq, 100, 64, 40), dtype, gen)
    go = torch.randn(2, 4, Lq, 40, generator=gen).to(dtype)
    n = 61
    kc, vc, kw = cache_with_garbage(k, v, n, how)
    got = forward_backward(sdpa, q, kc, vc, go, keep_nan=True, enable_gqa=True, **kw)
    want = forward_backward(sdpa, q, k[:, :, :n], v[:, :, :n], go, keep_nan=True, enable_gqa=True)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        if name in ("dk", "dv"):
            assert (a[:, :, n:] == 0).all(), name
            a = a[:, :, :n]
        torch.testing.assert_close(a, b, **garbage_tolerance(dtype), msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("how", ["bool", "key_lengths"])
@pytest.mark.parametrize("B,Lq", [(2, 5), (2, 9), (2, 40), (2, 70), (4, 12), (4, 100)])
def test_tiles_ignore_masked_garbage_in_the_cache(dtype, how, B, Lq):
    """A padded cache's valid prefix marked by key_lengths or by a bool mask (chunked prefill
    into a preallocated cache): NaN/inf past it must not reach any output or gradient on the tile
    kernels either (the bf16 ones work on chunks of 64 keys, and took 0·inf = NaN from the
    padding before it was packed as zeros; under a bool mask every tile kernel took 0·NaN in
    P·V and dS·K before they set such rows aside). B = 4: the bf16 kernels pack K and V per
    (batch, kv head) task on two threads."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = make_inputs((B, 4, 2, Lq, 300, 64, 40), dtype, gen)
    go = torch.randn(B, 4, Lq, 40, generator=gen).to(dtype)
    n = 161
    kc, vc, kw = cache_with_garbage(k, v, n, how)
    got = forward_backward(sdpa, q, kc, vc, go, keep_nan=True, enable_gqa=True, **kw)
    want = forward_backward(sdpa, q, k[:, :, :n], v[:, :, :n], go, keep_nan=True,
                            enable_gqa=True)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        if name in ("dk", "dv"):
            assert (a[:, :, n:] == 0).all(), name
            a = a[:, :, :n]
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, **garbage_tolerance(dtype), msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("Lq", [4, 6, 20, 40, 70])
@pytest.mark.parametrize("how", ["causal", "window_br"])
def test_tiles_ignore_garbage_that_causal_or_window_rule_out(dtype, Lq, how):
    """NaN/inf in K and V rows that the causal or window mask rules out for every query (keys
    past the last query under top-left causal; the oldest slots of a cache under a window) must
    not reach any output or gradient. The bf16 tile kernels multiply whole chunks of 32–64
    keys, and took 0·NaN from such rows in the chunk of the last allowed key (found by review):
    every output of the block NaN at 40 queries, dQ NaN from 5."""
    gen = torch.Generator().manual_seed(stable_seed(dtype, Lq, how))
    Lk = Lq + 61 if how == "causal" else Lq + 150
    q, k, v = make_inputs((2, 4, 2, Lq, Lk, 64, 40), dtype, gen)
    go = torch.randn(2, 4, Lq, 40, generator=gen).to(dtype)
    if how == "causal":  # top-left: keys from Lq on are never seen
        kw, bad = dict(is_causal=True), slice(Lq, None)
    else:  # bottom-right window 9: keys before Lk − Lq − 8 are never seen
        kw, bad = dict(is_causal=True, window=9, causal_alignment="bottom_right"), slice(0, Lk - Lq - 8)
    kc, vc = k.clone(), v.clone()
    kc[:, :, bad], vc[:, :, bad] = float("nan"), float("inf")
    got = forward_backward(sdpa, q, kc, vc, go, keep_nan=True, enable_gqa=True, **kw)
    want = forward_backward(sdpa, q, k, v, go, keep_nan=True, enable_gqa=True, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        if name in ("dk", "dv"):
            assert (a[:, :, bad] == 0).all(), name
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, **garbage_tolerance(dtype), msg=name)


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), g=st.sampled_from([1, 2, 4]),
       Lq=st.integers(1, 80), Lk=st.integers(1, 80), D=st.sampled_from([8, 16, 40, 64]),
       causal=st.booleans(), br=st.booleans(), window=st.one_of(st.none(), st.integers(1, 20)),
       lengths=st.booleans(), mask=st.sampled_from([None, "bool", "additive"]),
       seed=st.integers(0, 2**31 - 1))
def test_random_problems_match_reference(B, Hkv, g, Lq, Lk, D, causal, br, window, lengths,
                                         mask, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make_inputs((B, Hkv * g, Hkv, Lq, Lk, D, D), torch.float64, gen)
    kw = dict(is_causal=causal or window is not None, window=window,
              causal_alignment="bottom_right" if br else "top_left")
    if lengths:
        kw["key_lengths"] = torch.randint(0, Lk + 1, (B,), generator=gen)
    if mask == "bool":
        kw["attn_mask"] = torch.rand(B, 1, Lq, Lk, generator=gen) > 0.3
    elif mask == "additive":
        kw["attn_mask"] = torch.randn(1, Hkv * g, Lq, Lk, generator=gen, dtype=torch.float64)
    go = torch.randn(B, Hkv * g, Lq, D, generator=gen, dtype=torch.float64)
    got = forward_backward(sdpa, q, k, v, go, enable_gqa=True, **kw)
    want = forward_backward(ref.scaled_dot_product_attention, q, k, v, go, enable_gqa=True, **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------- bad input ----------------

def _qkv(Hq=4, Hkv=4, D=16, Dk=None, dtype=torch.float32):
    return (torch.randn(2, Hq, 5, D, dtype=dtype), torch.randn(2, Hkv, 6, Dk or D, dtype=dtype),
            torch.randn(2, Hkv, 6, D, dtype=dtype))


@pytest.mark.parametrize("dtype,mask_dtype", [(torch.bfloat16, torch.float32),
                                              (torch.float16, torch.float32),
                                              (torch.float64, torch.float32),
                                              (torch.float32, torch.float64)], ids=str)
def test_additive_mask_of_another_float_dtype(dtype, mask_dtype):
    """As torch accepts: a float mask whatever the query's float dtype (an fp32 mask in a bf16
    model); the mask's gradient keeps the mask's dtype."""
    gen = torch.Generator().manual_seed(21)
    q, k, v = make_inputs((2, 4, 2, 9, 20, 16, 16), dtype, gen)
    m = torch.randn(9, 20, generator=gen, dtype=mask_dtype).requires_grad_()
    go = torch.randn(2, 4, 9, 16, generator=gen).to(dtype)
    ours = forward_backward(sdpa, q, k, v, go, enable_gqa=True, attn_mask=m)
    dm = torch.autograd.grad(sdpa(q, k, v, attn_mask=m, enable_gqa=True), m, go)[0]
    assert ours[0].dtype == dtype and dm.dtype == mask_dtype
    exact = forward_backward(ref.scaled_dot_product_attention, q.double(), k.double(), v.double(),
                             go.double(), enable_gqa=True, attn_mask=m.detach().double())
    md = m.detach().double().requires_grad_()
    dm_exact = torch.autograd.grad(ref.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=md, enable_gqa=True), md, go.double())[0]
    tol = {torch.bfloat16: dict(atol=3e-2, rtol=3e-2), torch.float16: dict(atol=4e-3, rtol=4e-3)}.get(
        dtype, dict(atol=1e-5, rtol=1e-5))
    for a, e in zip([*ours, dm], [*exact, dm_exact]):
        torch.testing.assert_close(a.double(), e, **tol)


@pytest.mark.parametrize("make,kw,exc,match", [
    (lambda: _qkv(D=16, Dk=8), {}, ValueError, "key head dim must equal query's: expected 16, got 8"),
    (lambda: _qkv(Hq=6, Hkv=4), dict(enable_gqa=True), ValueError, "multiple of key/value heads: Hq=6, Hkv=4"),
    (lambda: _qkv(Hq=4, Hkv=2), {}, ValueError, "enable_gqa=True"),
    (lambda: _qkv(), dict(attn_mask=torch.ones(3, 5, 6, dtype=torch.bool)), ValueError,
     r"attn_mask of shape \(3, 5, 6\) is not broadcastable to \(2, 4, 5, 6\)"),
    (lambda: _qkv(), dict(attn_mask=torch.ones(5, 6, dtype=torch.int32)), TypeError,
     r"attn_mask must be bool \(True = allowed\) or floating point \(additive\), got torch.int32"),
    (lambda: _qkv(), dict(is_causal=True, window=0), ValueError, "window must be >= 1, got 0"),
    (lambda: _qkv(), dict(window=2), ValueError, "requires is_causal=True"),
    (lambda: _qkv(), dict(key_lengths=torch.tensor([1, 2, 3])), ValueError, "key_lengths must be a 1-D integer tensor of length 2"),
    (lambda: _qkv(), dict(key_lengths=torch.tensor([1, -2])), ValueError, "key_lengths must be >= 0"),
    (lambda: _qkv(), dict(dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\]"),
    (lambda: _qkv(), dict(is_causal=True, causal_alignment="center"), ValueError, "causal_alignment must be one of"),
    (lambda: (torch.randn(2, 4, 5, 16), torch.randn(2, 4, 6, 16, dtype=torch.float64),
              torch.randn(2, 4, 6, 16)), {}, TypeError, "key dtype must match query's: expected torch.float32, got torch.float64"),
    (lambda: (torch.randn(2, 4, 5, 16), torch.randn(2, 4, 6, 16), torch.randn(2, 4, 7, 16)), {},
     ValueError, "key and value must agree"),
    (lambda: (torch.randn(5, 16), torch.randn(6, 16), torch.randn(6, 16)), {}, ValueError,
     r"query must be \(B, H, L, D\) or \(B, L, D\)"),
    (lambda: (torch.randn(3, 4, 5, 16), torch.randn(2, 4, 6, 16), torch.randn(2, 4, 6, 16)), {},
     ValueError, "key batch size must equal query's: expected 3, got 2"),
])
def test_bad_input_raises_clear_error(make, kw, exc, match):
    q, k, v = make()
    with pytest.raises(exc, match=match):
        sdpa(q, k, v, **kw)


def test_cpp_checks_reject_bad_shapes_directly():
    from seqkern import _ext

    q = torch.randn(1, 3, 4, 8)
    k = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match=r"query heads \(3\) must be a multiple"):
        _ext._C.attention_forward(q, k, k, None, None, False, False, 0, 1.0)
    with pytest.raises(RuntimeError, match="head dims differ"):
        _ext._C.attention_forward(q, torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 8), None,
                                  None, False, False, 0, 1.0)



@pytest.mark.parametrize("path", ["brgemm", "tiles"])
@pytest.mark.parametrize("shape", [(1, 2, 2, 129, 129, 64, 64), (2, 4, 1, 70, 300, 40, 24),
                                   (1, 2, 1, 600, 1000, 16, 16), (1, 1, 1, 5, 513, 128, 128),
                                   (1, 2, 2, 65, 65, 256, 256), (2, 8, 2, 3, 150, 40, 24),
                                   (2, 4, 2, 15, 300, 40, 24), (1, 3, 1, 29, 257, 64, 48)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["none", "causal", "causal_br", "window_br",
                                  "causal+bool+key_lengths", "window+additive"])
def test_bfloat16_paths(path, shape, kind, monkeypatch):
    """bfloat16 forward and backward on oneDNN brgemm tiles (CPUs with AMX; several key blocks,
    Lk not a multiple of the block, head dims needing padding, GQA, few query rows: 3 on the
    row-wise kernels (5 too: this test trains), 15 and 29 on the transposed few-query forward) and
    on the fp32 tile kernels: outputs and every gradient within twice torch's bf16 error of the
    float64 reference."""
    if path == "brgemm" and not AMX:
        pytest.skip("no bf16 tiles on this CPU (neither AMX nor AVX512_BF16): the fp32 tile kernel serves bf16 (tested as 'tiles')")
    monkeypatch.setenv("SEQKERN_ATTENTION_AMX", "1" if path == "brgemm" else "0")
    gen = torch.Generator().manual_seed(stable_seed(shape, kind))
    q, k, v, kw, kw64 = make_problem(shape, kind, torch.bfloat16, gen)
    B, Hq, _, Lq, _, _, Dv = shape
    go = torch.randn(B, Hq, Lq, Dv, generator=gen).to(torch.bfloat16)
    exact = forward_backward(ref.scaled_dot_product_attention, q.double(), k.double(),
                             v.double(), go.double(), enable_gqa=True, **kw64)
    ours = forward_backward(sdpa, q, k, v, go, enable_gqa=True, **kw)
    theirs = forward_backward(torch_sdpa, q, k, v, go, **kw)
    for name, a, t, e in zip(("out", "dq", "dk", "dv"), ours, theirs, exact):
        assert a.dtype == torch.bfloat16
        bound = 2 * max_err(t, e) + FLOOR[torch.bfloat16] * max(1.0, e.abs().max().item())
        assert max_err(a, e) <= bound, f"{name}: error {max_err(a, e):.3g} > {bound:.3g}"


@pytest.mark.parametrize("shape", [(1, 2, 1, 5, 300, 64, 64), (2, 4, 2, 15, 257, 40, 24),
                                   (1, 3, 1, 29, 513, 64, 48), (2, 2, 2, 32, 130, 128, 128),
                                   (1, 2, 1, 16, 1000, 16, 16), (1, 1, 1, 17, 33, 256, 256),
                                   (1, 2, 1, 9, 3, 64, 64), (1, 2, 2, 33, 200, 64, 64)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["none", "causal_br", "window_br", "key_lengths",
                                  "causal_br+bool_padding", "bool", "additive"])
def test_bfloat16_inference_within_torch_error(shape, kind):
    """bfloat16 without gradients: from 5 to 32 queries the output is computed with P rounded
    to bf16 and P·V on bf16 tiles where the CPU has them (training keeps P in fp32); every query
    count and mask within twice torch's bf16 error of the float64 reference, with no error
    floor but the output's own rounding."""
    gen = torch.Generator().manual_seed(stable_seed(shape, kind))
    q, k, v, kw, kw64 = make_problem(shape, kind, torch.bfloat16, gen)
    with torch.no_grad():
        exact = ref.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                 enable_gqa=True, **kw64)
        ours = sdpa(q, k, v, enable_gqa=True, **kw)
        theirs = torch_sdpa(q, k, v, **kw)
    assert ours.dtype == torch.bfloat16 and not ours.isnan().any()
    # half an ulp of bf16 at the output's size: the rounding every bf16 output carries
    ulp = 2.0 ** -8 * max(1.0, exact.abs().max().item())
    bound = 2 * max_err(theirs, exact) + ulp
    assert max_err(ours, exact) <= bound, f"error {max_err(ours, exact):.3g} > {bound:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("Lq", [3, 8, 20, 40])
@pytest.mark.parametrize("fill", [-1e10, -1e12, -1e20, -1e30])
def test_rows_masked_by_a_large_finite_constant(dtype, Lq, fill):
    """A query row whose additive mask is one large finite constant (masked_fill(-1e10) on a
    padded position): a shift of the whole row, so it stays a softmax, never NaN. The bf16
    kernels once took the exponent as s·(scale·log2 e) − m·log2 e with m·log2 e rounded to fp32,
    off by ~500 at |m| = 1e10: the row's weights overflowed, its output was NaN and the
    gradients of every key NaN. Outputs and gradients within twice torch's error of float64;
    past |fill| ~ 1e15 the float64 log-sum-exp cannot hold log(n) beside the fill, so the
    backward's weights of that row are off (README, known limitations): there only the outputs
    are compared, and the gradients must be finite."""
    gen = torch.Generator().manual_seed(stable_seed(dtype, Lq, fill))
    q, k, v = make_inputs((1, 2, 2, Lq, 50, 32, 32), dtype, gen)
    m = torch.zeros(Lq, 50, dtype=torch.float64)
    m[0] = fill
    go = torch.randn(1, 2, Lq, 32, generator=gen, dtype=torch.float64).to(dtype)
    exact = forward_backward(ref.scaled_dot_product_attention, q.double(), k.double(), v.double(),
                             go.double(), attn_mask=m)
    ours = forward_backward(sdpa, q, k, v, go, keep_nan=True, attn_mask=m.to(dtype))
    theirs = forward_backward(torch_sdpa, q, k, v, go, attn_mask=m.to(dtype))
    for name, a, t, e in zip(("out", "dq", "dk", "dv"), ours, theirs, exact):
        assert not a.isnan().any(), f"{name}: NaN"
        if name != "out" and fill < -1e15:
            continue
        bound = 2 * max_err(t, e) + FLOOR[dtype] * max(1.0, e.abs().max().item())
        assert max_err(a, e) <= bound, f"{name}: error {max_err(a, e):.3g} > {bound:.3g}"


# ---------------------------------------------------------------- additive-mask gradients ---

MASK_SHAPES = ["full", "2d", "per_batch", "per_head_key"]


def make_additive_mask(which, B, Hq, Lq, Lk, gen):
    """An additive mask of one of the broadcast shapes users pass (learned biases: full,
    shared (Lq, Lk) as ALiBi/T5, per batch, per head and key), some entries -inf."""
    shape = {"full": (B, Hq, Lq, Lk), "2d": (Lq, Lk), "per_batch": (B, 1, Lq, Lk),
             "per_head_key": (Hq, 1, Lk)}[which]
    m = torch.randn(shape, generator=gen, dtype=torch.float64)
    m[torch.rand(shape, generator=gen) < 0.1] = float("-inf")
    return m


def grads_with_mask(fn, q, k, v, m, go, **kw):
    ts = [t.detach().requires_grad_() for t in (q, k, v, m)]
    out = fn(*ts[:3], attn_mask=ts[3], enable_gqa=True, **kw)
    return [out.detach()] + [g.nan_to_num(0.0) for g in torch.autograd.grad(out, ts, go.to(out.dtype))]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("which", MASK_SHAPES)
@pytest.mark.parametrize("kind", ["none", "causal", "window_br+key_lengths"])
def test_additive_mask_gradient_float64(shape, which, kind):
    """d(attn_mask) equals the reference's, summed over the dims the mask broadcasts along,
    next to unchanged dq/dk/dv."""
    gen = torch.Generator().manual_seed(stable_seed(shape, which, kind))
    B, Hq, Hkv, Lq, Lk, D, Dv = shape
    q, k, v = make_inputs(shape, torch.float64, gen)
    kw = make_mask_kwargs(kind, B, Hq, Lq, Lk, torch.float64, gen)
    m = make_additive_mask(which, B, Hq, Lq, Lk, gen)
    go = torch.randn(B, Hq, Lq, Dv, generator=gen, dtype=torch.float64)
    got = grads_with_mask(sdpa, q, k, v, m, go, **kw)
    want = grads_with_mask(ref.scaled_dot_product_attention, q, k, v, m, go, **kw)
    assert got[4].shape == m.shape
    for name, a, b in zip(("out", "dq", "dk", "dv", "dmask"), got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("dtype,path", [(torch.float32, "tiles"), (torch.bfloat16, "tiles"),
                                        (torch.bfloat16, "brgemm")], ids=str)
@pytest.mark.parametrize("which", MASK_SHAPES)
def test_additive_mask_gradient_low_precision(dtype, path, which, monkeypatch):
    """Each gradient, d(attn_mask) included, within 2× torch's own error in that dtype."""
    if path == "brgemm" and not AMX:
        pytest.skip("no bf16 tiles on this CPU (neither AMX nor AVX512_BF16): the fp32 tile kernel serves bf16 (tested as 'tiles')")
    monkeypatch.setenv("SEQKERN_ATTENTION_AMX", "1" if path == "brgemm" else "0")
    gen = torch.Generator().manual_seed(stable_seed(which, dtype))
    shape = (2, 4, 2, 70, 129, 40, 40)
    B, Hq, Hkv, Lq, Lk, D, Dv = shape
    q, k, v = make_inputs(shape, dtype, gen)
    m = make_additive_mask(which, B, Hq, Lq, Lk, gen)
    go = torch.randn(B, Hq, Lq, Dv, generator=gen, dtype=torch.float64)
    exact = grads_with_mask(ref.scaled_dot_product_attention, q.double(), k.double(),
                            v.double(), m, go, is_causal=True)
    ours = grads_with_mask(sdpa, q, k, v, m.to(dtype), go, is_causal=True)
    theirs = grads_with_mask(torch_sdpa, q, k, v, m.to(dtype), go, is_causal=True)
    for name, a, t, e in zip(("out", "dq", "dk", "dv", "dmask"), ours, theirs, exact):
        assert a.dtype == dtype
        bound = 2 * max_err(t, e) + FLOOR[dtype] * max(1.0, e.abs().max().item())
        assert max_err(a, e) <= bound, f"{name}: error {max_err(a, e):.3g} > {bound:.3g}"


@pytest.mark.parametrize("threads", [1, 2])
def test_broadcast_mask_gradient_does_not_depend_on_threads(threads):
    """A mask shared by batches and heads is summed per thread, then across threads."""
    gen = torch.Generator().manual_seed(3)
    shape = (3, 8, 2, 33, 33, 16, 16)
    q, k, v = make_inputs(shape, torch.float64, gen)
    m = make_additive_mask("2d", 3, 8, 33, 33, gen)
    go = torch.randn(3, 8, 33, 16, generator=gen, dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = grads_with_mask(sdpa, q, k, v, m, go, is_causal=True)
    finally:
        torch.set_num_threads(before)
    want = grads_with_mask(ref.scaled_dot_product_attention, q, k, v, m, go, is_causal=True)
    torch.testing.assert_close(got[4], want[4], atol=1e-10, rtol=1e-10)


def test_gradcheck_additive_mask_float64():
    gen = torch.Generator().manual_seed(11)
    q, k, v = make_inputs((2, 4, 2, 6, 8, 8, 4), torch.float64, gen)
    m = torch.randn(4, 1, 8, generator=gen, dtype=torch.float64)
    fn = lambda q, k, v, m: sdpa(q, k, v, attn_mask=m, is_causal=True, enable_gqa=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (q, k, v, m)))


# ---------------------------------------------------------------- dropout -------------------

def dropout_pair(q, k, v, go, p, seed, **kw):
    """(kernel, reference) forward and gradients for the same dropout pattern: the kernel's seed
    is drawn after torch.manual_seed(seed), the reference gets the pattern it denotes."""
    B, Hq, Lq, Lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    torch.manual_seed(seed)
    keep = ops.dropout_keep_mask((B, Hq, Lq, Lk), p, ops._draw_seed())
    torch.manual_seed(seed)
    ours = forward_backward(sdpa, q, k, v, go, enable_gqa=True, dropout_p=p, **kw)
    want = forward_backward(ref.scaled_dot_product_attention, q.double(), k.double(), v.double(),
                            go.double(), enable_gqa=True, dropout_p=p, dropout_mask=keep,
                            **{n: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point()
                               else t for n, t in kw.items()})
    ref_same = forward_backward(ref.scaled_dot_product_attention, q, k, v, go, enable_gqa=True,
                                dropout_p=p, dropout_mask=keep, **kw)
    return ours, want, ref_same


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["none", "causal", "window_br+additive", "causal+bool+key_lengths"])
@pytest.mark.parametrize("p", [0.2, 0.7])
def test_dropout_matches_reference_with_the_same_pattern(dtype, shape, kind, p):
    """Forward and gradients with dropout equal the reference applying the pattern that
    dropout_keep_mask reports for the seed (float64 exactly; lower precision within 2× the
    reference's own error in that dtype)."""
    gen = torch.Generator().manual_seed(stable_seed(shape, kind, p))
    B, Hq, Hkv, Lq, Lk, D, Dv = shape
    q, k, v = make_inputs(shape, dtype, gen)
    kw = make_mask_kwargs(kind, B, Hq, Lq, Lk, dtype, gen)
    go = torch.randn(B, Hq, Lq, Dv, generator=gen, dtype=torch.float64).to(dtype)
    ours, exact, theirs = dropout_pair(q, k, v, go, p, stable_seed(shape), **kw)
    # A fused backward (ours, and torch's flash kernel) takes Δ = rowsum(dO ⊙ O) from the output
    # as stored, rounded to the dtype; the unfused reference never forms Δ, so a query with a
    # single allowed key has an exactly zero score gradient there (P = 1). With dropout's
    # 1/(1 − p) scaling, O is large enough for that rounding to show in dq and dk of such rows:
    # allow one rounding of Δ, times the scale and the largest key/query entry.
    delta = (go.double() * exact[0]).abs().sum(-1).max().item() if exact[0].numel() else 0.0
    eps = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8}.get(dtype, 0.0)
    scale = 1 / math.sqrt(D)
    rounding = {"dq": scale * eps * delta * k.double().abs().max().item(),
                "dk": scale * eps * delta * q.double().abs().max().item()}
    for name, a, t, e in zip(("out", "dq", "dk", "dv"), ours, theirs, exact):
        if dtype == torch.float64:
            torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10, msg=lambda s: f"{name}: {s}")
        else:
            bound = (2 * max_err(t, e) + FLOOR[dtype] * max(1.0, e.abs().max().item())
                     + rounding.get(name, 0.0))
            assert max_err(a, e) <= bound, f"{name}: error {max_err(a, e):.3g} > {bound:.3g}"


@pytest.mark.parametrize("path", ["brgemm", "tiles"])
def test_dropout_bfloat16_paths(path, monkeypatch):
    if path == "brgemm" and not AMX:
        pytest.skip("no bf16 tiles on this CPU (neither AMX nor AVX512_BF16): the fp32 tile kernel serves bf16 (tested as 'tiles')")
    monkeypatch.setenv("SEQKERN_ATTENTION_AMX", "1" if path == "brgemm" else "0")
    gen = torch.Generator().manual_seed(8)
    q, k, v = make_inputs((1, 2, 1, 300, 600, 64, 64), torch.bfloat16, gen)
    go = torch.randn(1, 2, 300, 64, generator=gen).to(torch.bfloat16)
    ours, exact, theirs = dropout_pair(q, k, v, go, 0.3, 4, is_causal=True,
                                       causal_alignment="bottom_right")
    for name, a, t, e in zip(("out", "dq", "dk", "dv"), ours, theirs, exact):
        bound = 2 * max_err(t, e) + FLOOR[torch.bfloat16] * max(1.0, e.abs().max().item())
        assert max_err(a, e) <= bound, f"{name}: error {max_err(a, e):.3g} > {bound:.3g}"


def test_dropout_pattern_statistics_and_seeds():
    """About a fraction p is dropped, with no structure along rows, columns or heads; a seed
    fixes the pattern, another seed gives another one."""
    p, shape = 0.3, (2, 3, 200, 300)
    keep = ops.dropout_keep_mask(shape, p, torch.tensor([7]))
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    for dim in (0, 1, 2, 3):  # every slice along each dim keeps about 1 − p
        frac = keep.float().mean(dim=[d for d in range(4) if d != dim])
        m = n // shape[dim]
        assert (frac - (1 - p)).abs().max().item() < 5 * math.sqrt(p * (1 - p) / m)
    # neighbours are independent: P(both kept) ≈ (1 − p)² along keys and along queries
    for a, b in ((keep[..., 1:], keep[..., :-1]), (keep[..., 1:, :], keep[..., :-1, :])):
        both = (a & b).float().mean().item()
        assert abs(both - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 / a.numel())
    assert torch.equal(keep, ops.dropout_keep_mask(shape, p, torch.tensor([7])))
    assert (keep != ops.dropout_keep_mask(shape, p, torch.tensor([8]))).float().mean() > 0.3
    assert ops.dropout_keep_mask(shape, 0.0, torch.tensor([7])).all()
    assert not ops.dropout_keep_mask(shape, 1.0, torch.tensor([7])).any()


def test_dropout_reproducible_with_manual_seed_and_independent_of_threads():
    gen = torch.Generator().manual_seed(2)
    q, k, v = make_inputs((2, 4, 2, 100, 100, 32, 32), torch.float32, gen)
    outs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(123)
            outs.append(sdpa(q, k, v, is_causal=True, dropout_p=0.4, enable_gqa=True))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    assert not torch.equal(outs[0], sdpa(q, k, v, is_causal=True, dropout_p=0.4, enable_gqa=True))
    # p = 1 drops everything, p = 0 is no dropout
    assert not sdpa(q, k, v, is_causal=True, dropout_p=1.0, enable_gqa=True).any()
    torch.testing.assert_close(sdpa(q, k, v, is_causal=True, dropout_p=0.0, enable_gqa=True),
                               sdpa(q, k, v, is_causal=True, enable_gqa=True))


def test_dropout_is_unbiased():
    """Averaged over seeds, the dropped output approaches the output without dropout."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = make_inputs((1, 2, 1, 16, 16, 16, 16), torch.float64, gen)
    torch.manual_seed(0)
    mean = sum(sdpa(q, k, v, is_causal=True, dropout_p=0.5, enable_gqa=True) for _ in range(400)) / 400
    plain = sdpa(q, k, v, is_causal=True, enable_gqa=True)
    # each output is a mean of ≤ 16 terms of std ≲ 1; 400 draws shrink that 20×
    assert (mean - plain).abs().max().item() < 0.25
    assert (mean - plain).abs().mean().item() < 0.05


@pytest.mark.parametrize("Lq", [6, 3], ids=["tiles", "decode"])
def test_gradcheck_dropout_float64(Lq):
    gen = torch.Generator().manual_seed(12)
    q, k, v = make_inputs((2, 2, 1, Lq, 8, 8, 4), torch.float64, gen)

    def fn(q, k, v):
        torch.manual_seed(0)  # the same pattern on every evaluation
        return sdpa(q, k, v, is_causal=True, dropout_p=0.3, enable_gqa=True)

    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (q, k, v)))


def test_multihead_attention_dropout_runs_on_the_kernel():
    """In training mode MultiheadAttention applies dropout through the kernel: the output equals
    the reference computed with the same pattern."""
    mha = seqkern.nn.MultiheadAttention(32, 4, dropout=0.25, batch_first=True).double().train()
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    torch.manual_seed(9)
    out, _ = mha(x, x, x, need_weights=False, is_causal=True)
    torch.manual_seed(9)
    keep = ops.dropout_keep_mask((2, 4, 20, 20), 0.25, ops._draw_seed())
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).view(2, 20, 3, 4, 8).permute(2, 0, 3, 1, 4)
    att = ref.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True,
                                           dropout_p=0.25, dropout_mask=keep)
    want = mha.out_proj(att.transpose(1, 2).reshape(2, 20, 32))
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    mha.eval()
    assert not torch.allclose(mha(x, x, x, need_weights=False)[0], out)


def test_cpp_checks_dropout_and_mask_grad_arguments():
    from seqkern import _ext

    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        _ext._C.attention_forward(q, q, q, None, None, False, False, 0, 1.0, 1.5, torch.tensor([1]))
    with pytest.raises(RuntimeError, match="needs dropout_seed"):
        _ext._C.attention_forward(q, q, q, None, None, False, False, 0, 1.0, 0.5, None)
    out, lse = _ext._C.attention_forward(q, q, q, None, None, False, False, 0, 1.0)
    with pytest.raises(RuntimeError, match="mask_grad needs an additive"):
        _ext._C.attention_backward(out, q, q, q, out, lse, None, None, False, False, 0, 1.0, 0.0,
                                   None, True)
    assert lse.dtype == torch.float64
    with pytest.raises(RuntimeError, match="lse must be Double of shape"):  # a float32 lse
        _ext._C.attention_backward(out, q, q, q, out, lse.float(), None, None, False, False, 0,
                                   1.0, 0.0, None, False)


def test_compile_fullgraph_mask_gradient_and_dropout():
    """torch.compile(fullgraph=True) traces the custom ops with a learned additive mask and
    dropout: without dropout it gives eager's gradients, the mask's included."""
    def f(q, k, v, m, p):
        return sdpa(q, k, v, attn_mask=m, is_causal=True, dropout_p=p)

    compiled = torch.compile(f, fullgraph=True)
    gen = torch.Generator().manual_seed(4)
    q, k, v = make_inputs((2, 2, 2, 33, 33, 16, 16), torch.float32, gen)
    m = torch.randn(33, 33, generator=gen)
    go = torch.randn(2, 2, 33, 16, generator=gen)
    got = grads_with_mask(lambda *a, **kw: compiled(*a[:3], kw["attn_mask"], 0.0), q, k, v, m, go)
    want = grads_with_mask(lambda *a, **kw: f(*a[:3], kw["attn_mask"], 0.0), q, k, v, m, go)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    ts = [t.clone().requires_grad_() for t in (q, k, v, m)]
    out = compiled(*ts, 0.3)
    out.backward(go)
    assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in ts)
    assert not torch.allclose(out, want[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_compile_fullgraph_low_precision_training(dtype):
    """Compiled bf16/fp16 training traces the float32 output the backward uses for Δ and the
    rounding after it: outputs in the input dtype, gradients equal to eager's."""
    torch._dynamo.reset()

    def f(q, k, v):
        return sdpa(q, k, v, is_causal=True, enable_gqa=True)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(6)
    q, k, v = make_inputs((2, 4, 2, 37, 37, 16, 24), dtype, gen)
    go = torch.randn(2, 4, 37, 24, generator=gen).to(dtype)
    got = forward_backward(compiled, q, k, v, go)
    want = forward_backward(f, q, k, v, go)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_window_with_key_lengths_leaves_some_rows_nothing(dtype):
    """A sliding window and a key length together leave late query rows with no key (their
    window starts past the key length) while other rows of the same tile still see keys."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = make_inputs((2, 2, 2, 600, 600, 64, 64), dtype, gen)
    kw = dict(is_causal=True, window=50, key_lengths=torch.tensor([100, 600]))
    with torch.no_grad():
        got = sdpa(q, k, v, **kw)
        exact = ref.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kw)
    assert torch.isfinite(got).all()
    assert (got[0, :, 150:] == 0).all()  # rows whose window lies past key 100
    torch.testing.assert_close(got.double(), exact, atol=FLOOR[dtype] * 8, rtol=0.02)


@pytest.mark.parametrize("window", [2**63 - 1, 2**70, 1001])
def test_window_past_every_key_is_no_window(window):
    """Any window at least Lq + Lk rules nothing out, however large the int (beyond int64 too)."""
    gen = torch.Generator().manual_seed(12)
    q, k, v = make_inputs((1, 2, 2, 300, 700, 32, 32), torch.float64, gen)
    with torch.no_grad():
        got = sdpa(q, k, v, is_causal=True, window=window)
    torch.testing.assert_close(got, ref.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_dispatch_modes_and_tracing_see_the_registered_op():
    """Eager calls skip the custom op's dispatch; a dispatch mode (FlopCounterMode) or make_fx
    must still see the registered op, and get the eager result."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils.flop_counter import FlopCounterMode

    gen = torch.Generator().manual_seed(3)
    q, k, v = make_inputs((1, 2, 2, 70, 70, 16, 16), torch.float32, gen)
    want = sdpa(q, k, v, is_causal=True)
    with FlopCounterMode(display=False):
        torch.testing.assert_close(sdpa(q, k, v, is_causal=True), want)
    gm = make_fx(lambda a, b, c: sdpa(a, b, c, is_causal=True))(q, k, v)
    assert "seqkern.attention_forward" in gm.code
    torch.testing.assert_close(gm(q, k, v), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("Lq", [2, 3])
def test_few_query_nan_score_gives_nan_for_any_thread_count(dtype, Lq):
    """A NaN score among -inf ones (a cache holding inf and NaN inside the allowed keys) makes
    the row NaN, as in the reference, however the keys were split into blocks: with one thread
    a bf16 pair of rows shares its first 16-key block, with two each row is scored alone."""
    Lk, D = 32, 16
    q = torch.zeros(1, 1, Lq, D, dtype=dtype)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, Lk, D, dtype=dtype)
    k[..., :, 0] = float("-inf")
    k[..., 0, 0] = float("nan")
    v = torch.ones(1, 1, Lk, 8, dtype=dtype)
    kw = dict(is_causal=True, causal_alignment="bottom_right")
    want = ref.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kw)
    assert want.isnan().all()
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert sdpa(q, k, v, **kw).isnan().all(), f"{n} thread(s)"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reference_backend_keeps_a_wider_mask_range(dtype):
    """The reference backend (also what torch.func transforms run) with an fp32 additive mask on
    fp16/bf16 queries: a masked_fill(-1e30) padding row and a +1e5 bias keep their meaning (cast
    to fp16 they became -inf, a row with no allowed key, and inf), as in the kernels."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 5, 16, generator=gen).to(dtype) for _ in range(3))
    am = torch.randn(1, 1, 5, 5, generator=gen)
    am[..., 0, :] = -1e30
    am[..., 1, 2] = 1e5
    got = sdpa(q, k, v, attn_mask=am)
    with seqkern.use_backend("reference"):
        want = sdpa(q, k, v, attn_mask=am)
    assert torch.isfinite(want).all() and want[..., 0, :].abs().sum() > 0
    torch.testing.assert_close(want, got, **garbage_tolerance(dtype))


@pytest.mark.skipif(seqkern._ext._C is None, reason="extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("Lq", [3, 40, 130])
def test_forward_without_lse_gives_the_same_output(dtype, Lq):
    """Eager inference asks the kernels for no log-sum-exp (need_lse=False): the output is the
    same, bit for bit, and the tile kernels return no lse (the decode kernels still write it)."""
    gen = torch.Generator().manual_seed(stable_seed(dtype, Lq, "lse"))
    q, k, v = make_inputs((2, 4, 2, Lq, 150, 64, 64), dtype, gen)
    args = (q, k, v, None, None, True, True, 0, 0.125)
    out, lse = seqkern._ext._C.attention_forward(*args)
    out2, lse2 = seqkern._ext._C.attention_forward(*args, need_lse=False)
    assert torch.equal(out, out2)
    assert lse.shape == (2, 4, Lq) and (lse2.numel() == 0 or torch.equal(lse, lse2))
