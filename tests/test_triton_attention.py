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
