"""The reference attention against torch's SDPA (float64, 1e-10) and against masks built
independently element by element, so the reference can serve as the definition of right."""
import math

import pytest
import torch
import torch.nn.functional as F

from seqkern.reference import attention as ref

TOL = dict(atol=1e-10, rtol=1e-10)


def rand(*shape, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def loop_mask(Lq, Lk, causal=False, delta=0, window=None, length=None):
    """SPEC's rules written one element at a time."""
    m = torch.zeros(Lq, Lk, dtype=torch.bool)
    for i in range(Lq):
        for j in range(Lk):
            ok = True
            if causal:
                ok &= j <= i + delta
            if window is not None:
                ok &= j > i + delta - window
            if length is not None:
                ok &= j < length
            m[i, j] = ok
    return m


@pytest.mark.parametrize("B,H,Lq,Lk,D", [(1, 1, 1, 1, 8), (2, 3, 7, 7, 16), (2, 2, 5, 11, 40),
                                         (1, 2, 13, 6, 64), (3, 1, 33, 33, 32)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_torch(B, H, Lq, Lk, D, is_causal):
    gen = torch.Generator().manual_seed(B * 1000 + Lq * 10 + Lk)
    q, k, v = rand(B, H, Lq, D, gen=gen), rand(B, H, Lk, D, gen=gen), rand(B, H, Lk, D, gen=gen)
    got = ref.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("kind", ["bool", "additive", "bool_2d", "additive_per_head"])
def test_explicit_masks_match_torch(kind):
    gen = torch.Generator().manual_seed(7)
    B, H, Lq, Lk, D = 2, 3, 9, 12, 16
    q, k, v = rand(B, H, Lq, D, gen=gen), rand(B, H, Lk, D, gen=gen), rand(B, H, Lk, D, gen=gen)
    if kind == "bool":
        m = torch.rand(B, 1, Lq, Lk, generator=gen) > 0.4
        m[..., 0] = True  # torch returns NaN for rows with nothing allowed; avoid those here
    elif kind == "bool_2d":
        m = torch.rand(Lq, Lk, generator=gen) > 0.4
        m[:, 0] = True
    elif kind == "additive":
        m = rand(B, 1, Lq, Lk, gen=gen)
    else:
        m = rand(1, H, Lq, Lk, gen=gen)
    got = ref.scaled_dot_product_attention(q, k, v, m, scale=0.37)
    want = F.scaled_dot_product_attention(q, k, v, m, scale=0.37)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (8, 1), (8, 2)])
def test_gqa_matches_torch(Hq, Hkv):
    gen = torch.Generator().manual_seed(Hq * 10 + Hkv)
    q, k, v = rand(2, Hq, 10, 16, gen=gen), rand(2, Hkv, 10, 16, gen=gen), rand(2, Hkv, 10, 16, gen=gen)
    got = ref.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("Lq,Lk", [(5, 5), (3, 8), (8, 3), (1, 6)])
@pytest.mark.parametrize("window", [None, 1, 2, 4])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_structural_masks_match_elementwise_definition(Lq, Lk, window, alignment):
    gen = torch.Generator().manual_seed(Lq * 100 + Lk)
    B, H, D = 2, 2, 8
    q, k, v = rand(B, H, Lq, D, gen=gen), rand(B, H, Lk, D, gen=gen), rand(B, H, Lk, D, gen=gen)
    lengths = torch.tensor([Lk, max(Lk - 2, 0)])
    delta = 0 if alignment == "top_left" else Lk - Lq
    got = ref.scaled_dot_product_attention(q, k, v, is_causal=True, window=window,
                                           key_lengths=lengths, causal_alignment=alignment)
    for b in range(B):
        m = loop_mask(Lq, Lk, True, delta, window, int(lengths[b]))
        s = q[b] @ k[b].transpose(-1, -2) / math.sqrt(D)
        s = s.masked_fill(~m, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)  # rows with no allowed key: zeros
        torch.testing.assert_close(got[b], p @ v[b], **TOL)


def test_fully_masked_rows_are_zero():
    gen = torch.Generator().manual_seed(3)
    q, k, v = rand(1, 2, 4, 8, gen=gen), rand(1, 2, 6, 8, gen=gen), rand(1, 2, 6, 8, gen=gen)
    m = torch.ones(1, 1, 4, 6, dtype=torch.bool)
    m[..., 2, :] = False
    out = ref.scaled_dot_product_attention(q, k, v, m)
    assert torch.all(out[:, :, 2] == 0)
    assert torch.isfinite(out).all()
    # bottom-right alignment with more queries than keys leaves the first rows empty too
    out = ref.scaled_dot_product_attention(q, k[:, :, :2], v[:, :, :2], is_causal=True,
                                           causal_alignment="bottom_right")
    assert torch.all(out[:, :, :2] == 0) and torch.all(out[:, :, 2:] != 0)


def test_bad_alignment():
    q = torch.zeros(1, 1, 2, 4)
    with pytest.raises(ValueError, match="causal_alignment"):
        ref.scaled_dot_product_attention(q, q, q, is_causal=True, causal_alignment="middle")


@pytest.mark.parametrize("chunks", [[12], [1] * 12, [5, 1, 6], [3, 3, 3, 3]])
@pytest.mark.parametrize("window", [None, 3])
def test_decode_chunks_equal_full(chunks, window):
    gen = torch.Generator().manual_seed(11)
    q, k, v = rand(2, 4, 12, 8, gen=gen), rand(2, 2, 12, 8, gen=gen), rand(2, 2, 12, 8, gen=gen)
    full = ref.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                            window=window)
    cache, outs, t = None, [], 0
    for n in chunks:
        o, cache = ref.decode_step(q[:, :, t:t + n], k[:, :, t:t + n], v[:, :, t:t + n], cache,
                                   window=window)
        outs.append(o)
        t += n
    torch.testing.assert_close(torch.cat(outs, dim=2), full, **TOL)
    assert cache[0].shape[2] == 12


@pytest.mark.parametrize("bool_mask", [False, True])
def test_three_dim_inputs_with_three_dim_mask(bool_mask):
    """(B, L, D) inputs with a (B, Lq, Lk) mask: the mask's first dim is the batch."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 6, 8), torch.randn(2, 6, 5)
    m = torch.rand(2, 3, 6) > 0.3 if bool_mask else torch.randn(2, 3, 6)
    if bool_mask:
        m[:, :, 0] = True  # no fully masked row (torch gives NaN there, the reference 0)
    torch.testing.assert_close(ref.scaled_dot_product_attention(q, k, v, m),
                               F.scaled_dot_product_attention(q, k, v, m))


def test_window_without_causal_is_refused_as_by_the_ops():
    """SPEC: the window bounds a causal row from below ("additionally j > i + δ − w"); without
    is_causal the reference refuses it, as seqkern.ops does, instead of allowing every later key."""
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="requires is_causal=True"):
        ref.scaled_dot_product_attention(q, q, q, window=2)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_weights_under_compiled_vmap_over_the_mask(kind):
    """vmap over masks alone (q, k shared) inside torch.compile: the weights' in-place mask
    fills once took a batched mask into the unbatched scores there (a shape error)."""
    gen = torch.Generator().manual_seed(3)
    q, k = rand(1, 2, 3, 4, gen=gen), rand(1, 2, 5, 4, gen=gen)
    ruled_out = torch.rand(4, 3, 5, generator=gen) < 0.4
    masks = ~ruled_out if kind == "bool" else \
        rand(4, 3, 5, gen=gen).masked_fill(ruled_out, float("-inf"))
    f = lambda m: ref.attention_weights(q, k, m)  # noqa: E731
    loop = torch.stack([f(m) for m in masks])
    torch._dynamo.reset()
    compiled = torch.compile(lambda m: torch.func.vmap(f)(m), backend="eager")(masks)
    torch.testing.assert_close(compiled, loop, **TOL)


def test_dead_row_with_overflowing_scores_keeps_gradients_finite():
    """A query with no allowed key gets zero weights; its scores must not reach the softmax's
    backward as they are: a masked key holding 3e38 made its row's softmax NaN, and NaN·0 spread
    to every key's gradient (torch's SDPA gives NaN here; the reference gives zeros)."""
    q = torch.randn(1, 1, 3, 4)
    q[0, 0, 0] = 4.0  # (q·k overflows to +inf for the masked key)
    q.requires_grad_()
    k = torch.randn(1, 1, 5, 4)
    k[0, 0, 4] = 3e38
    k.requires_grad_()
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[:, 4] = False
    mask[0] = False  # query 0: no allowed key
    p = ref.attention_weights(q, k, mask)
    assert torch.equal(p[0, 0, 0], torch.zeros(5))
    p.square().sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_broadcasts_to_agrees_with_torch_broadcast_shapes():
    """The plain-size shape check that replaced torch.broadcast_shapes (20 µs a call) on the
    mask path: the same verdict on every pairing of small shapes."""
    import itertools

    dims = (1, 2, 3)
    shapes = [s for n in range(0, 5) for s in itertools.product(dims, repeat=n)]
    for shape in shapes:
        for target in (s for s in shapes if len(s) >= 3):
            try:
                want = torch.broadcast_shapes(shape, target) == target
            except RuntimeError:
                want = False
            assert ref.broadcasts_to(shape, target) == want, (shape, target)
