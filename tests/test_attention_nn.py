"""seqkern.nn.MultiheadAttention against torch.nn.MultiheadAttention (shared state_dict), and
CausalSelfAttention's KV cache (token-by-token and chunked prefill equal the full forward)."""
import pytest
import torch

import seqkern
from seqkern import registry
from seqkern.nn import CausalSelfAttention, KVCache, MultiheadAttention

pytestmark = pytest.mark.skipif(not registry.availability("cpu")[0],
                                reason="the C++ extension is not built")
TOL = dict(atol=1e-10, rtol=1e-10)


def pair(seed=0, **kw):
    torch.manual_seed(seed)
    theirs = torch.nn.MultiheadAttention(16, 4, **kw).double()
    ours = MultiheadAttention(16, 4, **kw).double()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # torch's, for "mixed"
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kw", [{}, dict(bias=False), dict(add_bias_kv=True),
                                dict(add_zero_attn=True), dict(kdim=5, vdim=7)],
                         ids=["plain", "nobias", "bias_kv", "zero_attn", "kdim_vdim"])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("masks", ["none", "bool", "float", "mixed", "per_head"])
def test_mha_matches_torch(batch_first, kw, need_weights, masks):
    ours, theirs = pair(batch_first=batch_first, **kw)
    N, L, S = 3, 6, 9
    gen = torch.Generator().manual_seed(1)

    def lay(t):
        return t if batch_first else t.transpose(0, 1)

    x = lay(torch.randn(N, L, 16, generator=gen, dtype=torch.float64))
    key = lay(torch.randn(N, S, kw.get("kdim", 16), generator=gen, dtype=torch.float64))
    val = lay(torch.randn(N, S, kw.get("vdim", 16), generator=gen, dtype=torch.float64))
    kpm = am = None
    if masks in ("bool", "mixed"):
        kpm = torch.zeros(N, S, dtype=torch.bool)
        kpm[1, 5:] = True
    if masks == "bool":
        am = torch.rand(L, S, generator=gen) < 0.3
        am[:, 0] = False
    if masks in ("float", "mixed"):
        am = torch.randn(L, S, generator=gen, dtype=torch.float64)
    if masks == "per_head":
        am = torch.randn(N * 4, L, S, generator=gen, dtype=torch.float64)
    a, wa = ours(x, key, val, key_padding_mask=kpm, attn_mask=am, need_weights=need_weights)
    b, wb = theirs(x, key, val, key_padding_mask=kpm, attn_mask=am, need_weights=need_weights)
    torch.testing.assert_close(a, b, **TOL)
    if need_weights:
        torch.testing.assert_close(wa, wb, **TOL)
    else:
        assert wa is None


def test_mha_state_dict_round_trip_and_gradients():
    ours, theirs = pair(batch_first=True)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    back = torch.nn.MultiheadAttention(16, 4, batch_first=True).double()
    back.load_state_dict(ours.state_dict())
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)
    a, _ = ours(x, x, x, attn_mask=causal, need_weights=False, is_causal=True)
    b, _ = back(x, x, x, attn_mask=causal, need_weights=False, is_causal=True)
    torch.testing.assert_close(a, b, **TOL)
    ga = torch.autograd.grad(a.sum(), [x] + list(ours.parameters()))
    gb = torch.autograd.grad(b.sum(), [x] + list(back.parameters()))
    for u, w in zip(ga, gb):
        torch.testing.assert_close(u, w, **TOL)


def test_mha_unbatched_and_self_attention_layout():
    ours, theirs = pair()
    x = torch.randn(5, 16, dtype=torch.float64)
    a, wa = ours(x, x, x, average_attn_weights=False)
    b, wb = theirs(x, x, x, average_attn_weights=False)
    torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(wa, wb, **TOL)


def test_mha_dropout_in_training_uses_reference_path_and_eval_is_exact():
    ours, theirs = pair(dropout=0.5, batch_first=True)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    torch.manual_seed(3)
    a, _ = ours(x, x, x, need_weights=False)
    torch.manual_seed(4)
    b, _ = ours(x, x, x, need_weights=False)
    assert not torch.allclose(a, b)  # dropout is active in training mode
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0],
                               theirs(x, x, x, need_weights=False)[0], **TOL)


def test_mha_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MultiheadAttention(10, 3)
    m = MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(2, 5\)"):
        m(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(5,\) for unbatched input, got \(1, 5\)"):
        m(x[0], x[0], x[0], key_padding_mask=torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must be"):
        m(x, x, x, attn_mask=torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="embed_dim=16"):
        m(torch.randn(2, 5, 8), x, x)
    with pytest.raises(ValueError, match=r"same batch size.*key \(3, 5, 16\)"):
        m(x, torch.randn(3, 5, 16), torch.randn(3, 5, 16))


# ---------------------------------------------------------------- CausalSelfAttention --------

def _decode_in_chunks(m, x, chunks, cache):
    """m's outputs for x fed through `cache` in chunks of the given sizes (1: step())."""
    outs, t = [], 0
    for n in chunks:
        outs.append(m.step(x[:, t], cache)[:, None] if n == 1 else m(x[:, t:t + n], cache))
        t += n
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("num_kv_heads", [8, 2, 1])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("chunks", [[1] * 24, [7, 1, 1, 15], [24]], ids=["tokens", "mixed", "one"])
def test_cache_decoding_equals_full_forward(num_kv_heads, window, chunks):
    torch.manual_seed(0)
    m = CausalSelfAttention(32, 8, num_kv_heads=num_kv_heads, window=window).double()
    x = torch.randn(2, 24, 32, dtype=torch.float64)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(2)
        torch.testing.assert_close(_decode_in_chunks(m, x, chunks, cache), full, **TOL)
        with seqkern.use_backend("reference"):
            torch.testing.assert_close(m(x), full, **TOL)
    assert cache.length == 24


def test_cache_grows_geometrically():
    cache = KVCache(1, 2, 4)
    reallocations, last = 0, None
    for t in range(1000):
        k, v = cache.append(torch.full((1, 2, 1, 4), float(t)), torch.full((1, 2, 1, 4), -float(t)))
        if cache.k is not last:
            reallocations, last = reallocations + 1, cache.k
    assert cache.length == 1000 and k.shape == (1, 2, 1000, 4)
    assert reallocations <= 8  # 16, 32, ..., 1024
    assert torch.equal(k[0, 0, :, 0], torch.arange(1000.0)) and torch.equal(v, -k)
    with pytest.raises(ValueError, match="cache holds"):
        cache.append(torch.zeros(1, 3, 1, 4), torch.zeros(1, 3, 1, 4))


def test_causal_self_attention_trains_and_rejects_bad_config():
    m = CausalSelfAttention(16, 4, num_kv_heads=2, window=3)
    x = torch.randn(2, 9, 16, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in m.parameters())
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        CausalSelfAttention(16, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="window must be >= 1"):
        CausalSelfAttention(16, 4, window=0)
    # a window that attention would refuse is refused here, before a forward grows a cache
    for bad in (2.5, True, "3"):
        with pytest.raises(TypeError, match="window must be an int or None"):
            CausalSelfAttention(16, 4, window=bad)
        with pytest.raises(TypeError, match="window must be an int or None"):
            KVCache(2, 2, 4, window=bad)
    with pytest.raises(ValueError, match=r"x must be \(B, L, 16\)"):
        m(torch.randn(9, 16))


@pytest.mark.parametrize("grad", [False, True])
def test_empty_chunk_on_an_empty_cache(grad):
    """A chunk of no tokens on a cache with no buffer yet gives an empty output, then decoding
    goes on as usual."""
    m = CausalSelfAttention(16, 2)
    x = torch.randn(2, 5, 16)
    cache = m.new_cache(2)
    with torch.set_grad_enabled(grad):
        assert m(x[:, :0], cache).shape == (2, 0, 16) and cache.length == 0
        out = m(x, cache)
    torch.testing.assert_close(out, m(x), atol=1e-5, rtol=1e-5)
    k, v = KVCache(2, 2, 8).append(torch.randn(2, 2, 0, 8), torch.randn(2, 2, 0, 8))
    assert k.shape == v.shape == (2, 2, 0, 8)


def test_mha_merge_masks_as_torch():
    ours, theirs = MultiheadAttention(8, 2), torch.nn.MultiheadAttention(8, 2)
    q = torch.randn(3, 5, 8)
    am2 = torch.randn(5, 5)
    am3 = torch.randn(3 * 2, 5, 5)
    kpm = torch.randn(3, 5)
    for am in (None, am2, am3):
        for kp in (None, kpm):
            got, want = ours.merge_masks(am, kp, q), theirs.merge_masks(am, kp, q)
            assert got[1] == want[1]
            assert (got[0] is None) == (want[0] is None)
            if want[0] is not None:
                assert torch.equal(got[0], want[0])


def test_autocast_runs_in_its_dtype():
    """torch.autocast casts scaled_dot_product_attention's floating inputs (float64 excepted),
    and the modules built on it run in bfloat16 with float32 parameters receiving gradients."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    mask = torch.randn(7, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = seqkern.ops.scaled_dot_product_attention(q, k.bfloat16(), v, attn_mask=mask)
        dbl = seqkern.ops.scaled_dot_product_attention(q.double(), k.double(), v.double())
    want = seqkern.ops.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(),
                                                    attn_mask=mask.bfloat16())
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert dbl.dtype == torch.float64
    x = torch.randn(2, 6, 16)
    for m in (MultiheadAttention(16, 4, batch_first=True), CausalSelfAttention(16, 4, 2)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x, x, x, need_weights=False)[0] if isinstance(m, MultiheadAttention) else m(x)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())
    csa = CausalSelfAttention(16, 4, 2)
    cache = csa.new_cache(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        whole = csa(x)
        steps = torch.stack([csa.step(x[:, t], cache) for t in range(6)], 1)
    torch.testing.assert_close(steps.float(), whole.float(), atol=2e-2, rtol=2e-2)


def test_torch_func_transforms_on_attention_and_conv():
    """grad, jvp and vmap through seqkern's ops (the reference runs under a transform)."""
    torch.manual_seed(0)
    q = torch.randn(1, 2, 6, 8, dtype=torch.float64)
    f = (lambda t: seqkern.ops.scaled_dot_product_attention(t, t * 0.5, t, is_causal=True,
                                                            window=3))
    g = torch.func.grad(lambda t: f(t).square().sum())(q)
    qq = q.clone().requires_grad_()
    f(qq).square().sum().backward()
    torch.testing.assert_close(g, qq.grad)
    tangent = torch.randn_like(q)
    _, jv = torch.func.jvp(f, (q,), (tangent,))
    eps = 1e-6
    torch.testing.assert_close(jv, (f(q + eps * tangent) - f(q - eps * tangent)) / (2 * eps),
                               atol=1e-6, rtol=1e-5)
    x, w = torch.randn(3, 4, 9, dtype=torch.float64), torch.randn(4, 2, 3, dtype=torch.float64)
    conv = (lambda xx: seqkern.ops.causal_conv1d(xx, w, dilation=2, groups=2).square().sum())
    per = torch.func.vmap(torch.func.grad(conv))(x.unsqueeze(1))
    for i in range(3):
        xi = x[i:i + 1].clone().requires_grad_()
        conv(xi).backward()
        torch.testing.assert_close(per[i], xi.grad)


def test_forward_mode_ad_propagates_tangents():
    """Inside forward_ad.dual_level() the ops run the reference, so a dual input's tangent comes
    out right (a kernel would compute on the primal and drop it; torch's own CPU SDPA and LSTM
    raise there)."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, dtype=torch.float64) for _ in range(3))
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    xc, w = torch.randn(3, 4, 9, dtype=torch.float64), torch.randn(6, 2, 3, dtype=torch.float64)
    lstm = seqkern.nn.LSTM(4, 5).double()
    fns = [
        (lambda a: seqkern.ops.scaled_dot_product_attention(a, k, v, is_causal=True), q),
        (lambda a: seqkern.ops.causal_conv1d(a, w, dilation=2, groups=2), xc),
        (lambda a: lstm(a)[0], x),
    ]
    for f, p in fns:
        t = torch.randn_like(p)
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(f(fwAD.make_dual(p, t))).tangent
        assert tangent is not None
        eps = 1e-6
        torch.testing.assert_close(tangent, (f(p + eps * t) - f(p - eps * t)) / (2 * eps),
                                   atol=1e-6, rtol=1e-5)


def test_autocast_with_keyword_arguments():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    x, w = torch.randn(1, 3, 7), torch.randn(4, 3, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert seqkern.ops.scaled_dot_product_attention(query=q, key=k, value=v).dtype == \
            torch.bfloat16
        assert seqkern.ops.scaled_dot_product_attention(query=q.bfloat16(), key=k,
                                                        value=v).dtype == torch.bfloat16
        assert seqkern.ops.causal_conv1d(x=x, weight=w).dtype == torch.bfloat16


@pytest.mark.parametrize("kw", [{"add_bias_kv": True}, {"add_zero_attn": True}, {}])
def test_mha_is_causal_hint_with_mask_as_torch(kw):
    """With attn_mask, is_causal is torch's hint: one of the two applies (the hint when neither
    the weights nor a key padding mask need the mask), which matters once a key is appended."""
    torch.manual_seed(0)
    L = 4
    causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    x = torch.randn(L, 2, 8)
    kpm = torch.zeros(2, L, dtype=torch.bool)
    m = MultiheadAttention(8, 2, **kw).eval()
    t = torch.nn.MultiheadAttention(8, 2, **kw).eval()
    t.load_state_dict(m.state_dict())
    for call in ({"need_weights": True}, {"need_weights": False, "key_padding_mask": kpm},
                 {"need_weights": False}):
        torch.testing.assert_close(m(x, x, x, attn_mask=causal, is_causal=True, **call)[0],
                                   t(x, x, x, attn_mask=causal, is_causal=True, **call)[0])


def test_batched_gradients_and_zero_head_dim():
    from torch.autograd.functional import jacobian

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    f = (lambda a: seqkern.ops.scaled_dot_product_attention(a, k, v, is_causal=True))
    torch.testing.assert_close(jacobian(f, q, vectorize=True), jacobian(f, q))
    qq = q.clone().requires_grad_()
    y = f(qq)
    eye = torch.eye(y.numel()).view(-1, *y.shape)
    (batched,) = torch.autograd.grad(y, qq, eye, is_grads_batched=True)
    for i in (0, 7, y.numel() - 1):
        (one,) = torch.autograd.grad(f(qq), qq, eye[i])
        torch.testing.assert_close(batched[i], one)
    # head dim 0: every score is 0, so each query averages V (dV = Lq/Lk per key here)
    q0, k0 = torch.randn(1, 1, 3, 0), torch.randn(1, 1, 4, 0)
    v0 = torch.randn(1, 1, 4, 2, requires_grad=True)
    out = seqkern.ops.scaled_dot_product_attention(q0, k0, v0)
    want = torch.nn.functional.scaled_dot_product_attention(q0, k0, v0.detach())
    torch.testing.assert_close(out, want)
    out.sum().backward()
    torch.testing.assert_close(v0.grad, torch.full_like(v0, 0.75))


def test_kv_cache_training_mode_gradients_and_dtype_changes():
    """A training-mode prefill then step() backpropagates (appends go out of place while
    autograd records); an empty cache follows the keys' dtype, a filled one refuses another."""
    torch.manual_seed(0)
    m = CausalSelfAttention(16, 4, 2)
    x = torch.randn(2, 5, 16)
    for capacity in (0, 64):
        cache = m.new_cache(2, capacity)
        y = torch.cat([m(x[:, :3], cache)] + [m.step(x[:, t], cache).unsqueeze(1)
                                              for t in range(3, 5)], 1)
        m.zero_grad()
        y.square().sum().backward()
        got = [p.grad.clone() for p in m.parameters()]
        m.zero_grad()
        m(x).square().sum().backward()
        for a, p in zip(got, m.parameters()):
            torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-5)
    md = CausalSelfAttention(16, 4, 2)
    cache = md.new_cache(2)
    md.double()
    with torch.no_grad():
        assert md(x.double(), cache).dtype == torch.float64
        md.float()
        with pytest.raises(TypeError, match="start a new cache"):
            md.step(x[:, 0], cache)


@pytest.mark.parametrize("window", [1, 3, 16])
@pytest.mark.parametrize("chunks", [[1] * 200, [7, 1, 1, 30, 1, 5] * 12])
def test_windowed_cache_stays_bounded_and_exact(window, chunks):
    """With a sliding window the cache drops keys no query can reach any more: memory stays
    bounded over long generation while every output equals the full forward's."""
    torch.manual_seed(0)
    m = CausalSelfAttention(16, 4, num_kv_heads=2, window=window).double()
    x = torch.randn(2, sum(chunks), 16, dtype=torch.float64)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(2)
        torch.testing.assert_close(_decode_in_chunks(m, x, chunks, cache), full, **TOL)
    assert cache.length == x.shape[1] and cache.dropped > 0
    assert cache.capacity <= 2 * (window + max(chunks)) + 16
    m.window = window + 1  # the dropped keys would now be needed
    with pytest.raises(RuntimeError, match="dropped keys older than its window"), torch.no_grad():
        m.step(x[:, 0], cache)


def test_cache_from_inference_mode_extends_outside_it():
    """A prompt prefilled under torch.inference_mode (its buffers inference tensors) can be
    decoded further under no_grad, or with grad enabled."""
    torch.manual_seed(0)
    m = CausalSelfAttention(16, 4).double()
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    with torch.no_grad():
        full = m(x)
    for capacity in (0, 64):
        with torch.inference_mode():
            cache = m.new_cache(1, capacity)
            first = m(x[:, :6], cache)
        with torch.no_grad():
            rest = [m.step(x[:, t], cache) for t in (6, 7)]
        last = m.step(x[:, 8], cache)
        torch.testing.assert_close(torch.cat([first, torch.stack(rest + [last], 1)], 1), full, **TOL)


def test_step_without_a_cache_raises():
    m = CausalSelfAttention(16, 4)
    with pytest.raises(TypeError, match="step needs a KVCache"):
        m.step(torch.randn(2, 16), None)
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        m(torch.randn(2, 3, 16), cache=object())


@pytest.mark.parametrize("window", [None, 2])
def test_cache_mixing_recorded_and_no_grad_appends_keeps_backward(window):
    """A recorded (grad) append leaves the cache holding tensors attention saved for backward;
    a later no-grad append, which may drop old keys, must not write into them."""
    torch.manual_seed(0)
    m = CausalSelfAttention(16, 4, window=window).double()
    x = torch.randn(1, 20, 16, dtype=torch.float64)
    cache = m.new_cache(1)
    y = m(x[:, :16], cache)  # exactly fills a 16-slot buffer
    with torch.no_grad():
        m.step(x[:, 16], cache)
    y.sum().backward()  # raised: a saved tensor modified in place
    assert m.qkv_proj.weight.grad is not None


def test_widening_the_window_before_any_drop_stays_exact():
    """A cache made for a narrow window, used by the module after its window widened, keeps
    what the wider window needs when it has not dropped anything yet."""
    torch.manual_seed(0)
    m = CausalSelfAttention(16, 4, window=2).double()
    cache = m.new_cache(1)
    m.window = None
    x = torch.randn(1, 18, 16, dtype=torch.float64)
    with torch.no_grad():
        full = m(x)
        got = _decode_in_chunks(m, x, [16, 1, 1], cache)
    torch.testing.assert_close(got, full, **TOL)
    assert cache.dropped == 0


@pytest.mark.parametrize("window", [None, 3])
def test_export_with_dynamic_batch_and_length(window):
    """torch.export with symbolic batch and length: the graph traced at L = 6 serves any L,
    down to L = 1 (a query-length test in the op's wrapper once put a guard L > 4 into it),
    forward and backward."""
    torch.manual_seed(3)
    m = CausalSelfAttention(16, 4, num_kv_heads=2, window=window).double()
    dims = ({0: torch.export.Dim("b"), 1: torch.export.Dim("t")},)
    ep = torch.export.export(m, (torch.randn(3, 6, 16, dtype=torch.float64),), dynamic_shapes=dims)
    for b, t in [(1, 1), (2, 3), (5, 17)]:
        x = torch.randn(b, t, 16, dtype=torch.float64, requires_grad=True)
        got, want = ep.module()(x), m(x)
        torch.testing.assert_close(got, want, **TOL)
        go = torch.randn_like(want)
        torch.testing.assert_close(torch.autograd.grad(got, x, go)[0],
                                   torch.autograd.grad(want, x, go)[0], **TOL)


def test_cache_filled_under_autocast_continues_outside_it():
    """Prefill under torch.autocast (the empty cache takes bf16), decode outside it: the held
    keys follow the new float32 ones instead of refusing them, and the result tracks the full
    float32 forward to bf16 accuracy (the reverse order already cast the new keys)."""
    torch.manual_seed(0)
    m = CausalSelfAttention(32, 4, 2)
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        cache = m.new_cache(2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(x[:, :5], cache)
        assert cache.k.dtype == torch.bfloat16
        outs = [m.step(x[:, t], cache) for t in range(5, 8)]
        assert cache.k.dtype == torch.float32 and cache.length == 8
        full = m(x)
    torch.testing.assert_close(torch.stack(outs, 1), full[:, 5:], atol=3e-2, rtol=3e-2)


def test_cached_step_compiles_with_fullgraph():
    """Decoding with a KV cache inside torch.compile(fullgraph=True): no graph break (the
    cache's inference-tensor check is not traced)."""
    torch.manual_seed(0)
    m = CausalSelfAttention(16, 4, 2)
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        cache = m.new_cache(2)
        m(x[:, :5], cache)
        step = torch.compile(m.step, fullgraph=True, backend="aot_eager")
        outs = [step(x[:, t], cache) for t in (5, 6)]
        full = m(x)
    torch.testing.assert_close(torch.stack(outs, 1), full[:, 5:], atol=1e-5, rtol=1e-5)


def test_cache_pickled_without_newer_attributes_loads():
    """A KVCache pickled before its private attributes existed still appends."""
    import pickle

    m = CausalSelfAttention(16, 4, 2)
    x = torch.randn(1, 4, 16)
    cache = m.new_cache(1)
    with torch.no_grad():
        m(x[:, :3], cache)
        state = dict(cache.__dict__)
        del state["_dtype_from_autocast"], state["_inference_buffers"]
        old = object.__new__(type(cache))
        old.__setstate__(state)
        restored = pickle.loads(pickle.dumps(old))
        torch.testing.assert_close(m.step(x[:, 3], restored), m(x)[:, 3], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fullgraph", [False, True])
@pytest.mark.parametrize("how", ["prefill", "unpickle"])
def test_compiled_step_outside_inference_mode_after_inference_buffers(how, fullgraph):
    """A cache whose buffers eager code made under inference_mode (a prefill there, or
    unpickling there), then decoded by a compiled step outside it: the compiled append copies
    the inference-tensor buffers once before writing (compiled code cannot ask is_inference;
    the cache remembers what eager code made, and __setstate__ recomputes it)."""
    import pickle

    torch.manual_seed(0)
    m = CausalSelfAttention(16, 4, 2)
    x = torch.randn(2, 9, 16)
    cache = m.new_cache(2)
    if how == "prefill":
        with torch.inference_mode():
            m(x[:, :5], cache)
    else:
        with torch.no_grad():
            m(x[:, :5], cache)
        blob = pickle.dumps(cache)
        with torch.inference_mode():
            cache = pickle.loads(blob)
    assert cache.k.is_inference()
    step = torch.compile(m.step, fullgraph=fullgraph, backend="aot_eager")
    with torch.no_grad():
        outs = [step(x[:, t], cache) for t in range(5, 9)]
        full = m(x)
    torch.testing.assert_close(torch.stack(outs, 1), full[:, 5:], atol=1e-5, rtol=1e-5)
    assert not cache.k.is_inference()
