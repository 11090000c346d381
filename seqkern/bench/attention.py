"""Attention suite: causal self-attention forward and forward+backward against
``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``, plus a sliding-window and a
KV-cache decode case and a few-query case (a chunk of 8 new tokens against a cache: speculative
decoding's verify step, small prefill chunks); float32, bfloat16 too in the full grid."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from seqkern.bench.case import Case

# (B, H, L, D) from the attention issue; causal self-attention.
GRID = [(8, 4, 256, 64), (4, 8, 1024, 64), (1, 16, 4096, 64), (2, 8, 2048, 128), (32, 8, 128, 64)]
WINDOW = (1, 16, 4096, 64, 256)      # B, H, L, D, w
DECODE = (1, 16, 4096, 64)           # B, H, cached tokens, D
CHUNK = (2, 16, 8, 4096, 64)         # B, H, new tokens, cached tokens, D
# the reference materialises B·H·L² scores; keep it to shapes where that is small
REFERENCE_MAX_SCORES = 4 * 2**20


def causal_flops(B, H, L, D):
    """QKᵀ and PV over the causal half: half of 4·B·H·L²·D."""
    return 2.0 * B * H * L * L * D


def _inputs(B, H, Lq, Lk, D, dtype, grad):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype).requires_grad_(grad)
    k = torch.randn(B, H, Lk, D, generator=g).to(dtype).requires_grad_(grad)
    v = torch.randn(B, H, Lk, D, generator=g).to(dtype).requires_grad_(grad)
    return q, k, v


def _impls(q, k, v, train, seqkern_kw, torch_kw, with_reference):
    from seqkern.ops import scaled_dot_product_attention as sdpa
    from seqkern.reference.attention import scaled_dot_product_attention as ref

    calls = {"seqkern": lambda: sdpa(q, k, v, **seqkern_kw),
             "torch": lambda: F.scaled_dot_product_attention(q, k, v, **torch_kw)}
    if with_reference:
        calls["reference"] = lambda: ref(q, k, v, **seqkern_kw)
    if not train:
        def nograd(f):
            def run():
                with torch.no_grad():
                    return f()
            return run
        return {n: nograd(f) for n, f in calls.items()}
    go = torch.randn(q.shape[:-1] + (v.shape[-1],)).to(q.dtype)

    def fwd_bwd(f):
        def run():
            return torch.autograd.grad(f(), (q, k, v), go)
        return run
    return {n: fwd_bwd(f) for n, f in calls.items()}


def _causal_case(B, H, L, D, dtype, train):
    def make():
        q, k, v = _inputs(B, H, L, L, D, dtype, train)
        return _impls(q, k, v, train, dict(is_causal=True), dict(is_causal=True),
                      B * H * L * L <= REFERENCE_MAX_SCORES)
    fl = causal_flops(B, H, L, D)
    return Case(suite="attention", op=f"attention {'fwd+bwd' if train else 'fwd'}",
                shape={"B": B, "H": H, "L": L, "D": D}, dtype=dtype, make=make,
                flops=3.5 * fl if train else fl,  # backward ≈ 2.5× forward's matmul work
                quick=L <= 1024, extra={"causal": True})


def _window_case(dtype):
    B, H, L, D, w = WINDOW

    def make():
        q, k, v = _inputs(B, H, L, L, D, dtype, False)
        i = torch.arange(L)
        allowed = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - w)
        return _impls(q, k, v, False, dict(is_causal=True, window=w), dict(attn_mask=allowed),
                      False)
    return Case(suite="attention", op="attention sliding window fwd",
                shape={"B": B, "H": H, "L": L, "D": D, "w": w}, dtype=dtype, make=make,
                flops=4.0 * B * H * L * w * D, quick=False, extra={"window": w})


def _decode_case(dtype):
    B, H, L, D = DECODE

    def make():
        q, k, v = _inputs(B, H, 1, L + 1, D, dtype, False)
        # one new token at the end of a cache: bottom-right causal = every cached key
        return _impls(q, k, v, False, dict(is_causal=True, causal_alignment="bottom_right"),
                      {}, True)
    return Case(suite="attention", op="attention decode",
                shape={"B": B, "H": H, "cache": L, "D": D}, dtype=dtype, make=make,
                flops=4.0 * B * H * (L + 1) * D,
                bytes=2.0 * B * H * (L + 1) * D * dtype.itemsize,
                quick=True)


def _chunk_case(dtype):
    B, H, Lq, L, D = CHUNK

    def make():
        q, k, v = _inputs(B, H, Lq, L + Lq, D, dtype, False)
        # bottom-right causal; torch gets it as the equivalent explicit mask
        i, j = torch.arange(Lq)[:, None], torch.arange(L + Lq)[None, :]
        return _impls(q, k, v, False, dict(is_causal=True, causal_alignment="bottom_right"),
                      dict(attn_mask=j <= i + L), False)
    return Case(suite="attention", op="attention chunk fwd",
                shape={"B": B, "H": H, "Lq": Lq, "cache": L, "D": D}, dtype=dtype, make=make,
                flops=4.0 * B * H * Lq * (L + Lq) * D,
                bytes=2.0 * B * H * (L + Lq) * D * dtype.itemsize, quick=False)


def cases(full: bool) -> list[Case]:
    out = []
    for dtype in ([torch.float32, torch.bfloat16] if full else [torch.float32]):
        for B, H, L, D in GRID:
            for train in (False, True):
                out.append(_causal_case(B, H, L, D, dtype, train))
        out.append(_window_case(dtype))
        out.append(_decode_case(dtype))
        if full:
            out.append(_chunk_case(dtype))
    return out
