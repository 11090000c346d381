"""Reference attention (SPEC "Causal masked attention"): the full score matrix is materialised,
which is what makes it clear, and what the kernels avoid.

Tensors are (B, H, L, D) as in ``torch.nn.functional.scaled_dot_product_attention``; 3-D inputs
(B, L, D) are treated as one head.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["scaled_dot_product_attention", "attention_weights", "allowed_keys",
           "causal_offset", "kv_cache_append", "decode_step"]

ALIGNMENTS = ("top_left", "bottom_right")


def causal_offset(Lq: int, Lk: int, causal_alignment: str) -> int:
    """δ of SPEC: query i may see key j iff j ≤ i + δ."""
    if causal_alignment not in ALIGNMENTS:
        raise ValueError(f"causal_alignment must be one of {ALIGNMENTS}, got {causal_alignment!r}")
    return 0 if causal_alignment == "top_left" else Lk - Lq


def allowed_keys(Lq: int, Lk: int, *, is_causal: bool = False, window: Optional[int] = None,
                 key_lengths: Optional[Tensor] = None, causal_alignment: str = "top_left",
                 device=None) -> Tensor:
    """Boolean (B or 1, 1, Lq, Lk) mask of what the causal / window / key-length rules allow."""
    if window is not None and not is_causal:  # (SPEC: the window bounds a causal row from below)
        raise ValueError("window (a sliding window over past keys) requires is_causal=True")
    delta = causal_offset(Lq, Lk, causal_alignment)
    i = torch.arange(Lq, device=device).unsqueeze(1)
    j = torch.arange(Lk, device=device).unsqueeze(0)
    ok = torch.ones(Lq, Lk, dtype=torch.bool, device=device)
    if is_causal:
        ok &= j <= i + delta
    if window is not None:
        ok &= j > i + delta - window
    ok = ok[None, None]
    if key_lengths is not None:
        ok = ok & (j < key_lengths.to(device).view(-1, 1, 1, 1))
    return ok


def attention_weights(q: Tensor, k: Tensor, attn_mask: Optional[Tensor] = None,
                      is_causal: bool = False, scale: Optional[float] = None,
                      enable_gqa: bool = False, *, window: Optional[int] = None,
                      key_lengths: Optional[Tensor] = None,
                      causal_alignment: str = "top_left") -> Tensor:
    """P = softmax(scale·QKᵀ + masks) of shape (B, Hq, Lq, Lk); rows with no allowed key are 0."""
    squeeze = q.dim() == 3
    if squeeze:  # (B, L, D): one head; a (B, Lq, Lk) mask keeps its batch dim in front
        q, k = q.unsqueeze(1), k.unsqueeze(1)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
    Lq, Lk, D = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    # (in place on the fresh score tensor, and the masks combined at their own broadcast
    # shapes: each pass over the (B, H, Lq, Lk) scores costs about as much as the product)
    s = (q * scale) @ k.transpose(-1, -2)  # (scaling q: Lq·D products, not Lq·Lk)
    ruled_out = None  # what the masks rule out, at its own (broadcastable) shape
    if is_causal or window is not None or key_lengths is not None:
        ruled_out = ~allowed_keys(Lq, Lk, is_causal=is_causal, window=window,
                                  key_lengths=key_lengths, causal_alignment=causal_alignment,
                                  device=q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            out = ~attn_mask
        else:
            # −inf rules a key out even if its score is NaN; the finite rest is added
            out = attn_mask == float("-inf")
            bias = attn_mask.masked_fill(out, 0.0)
            s = s.add_(bias) if _fits_in_place(bias, s) and bias.dtype == s.dtype else s + bias
        ruled_out = out if ruled_out is None else ruled_out | out
    if ruled_out is None:
        p = torch.softmax(s, dim=-1)
    else:
        # A row with no allowed key attends to nothing (zeros). Its scores become 0, not −inf
        # (or its own, which may overflow), so its softmax, zeroed afterwards, has finite
        # gradients; one pass over s for both fills.
        dead = ruled_out.all(-1, keepdim=True)
        fill = torch.where(dead, 0.0, float("-inf")).to(s.dtype)
        p = torch.softmax(torch.where(ruled_out, fill, s), dim=-1).masked_fill(dead, 0.0)
    return p.squeeze(1) if squeeze else p


def broadcasts_to(shape: tuple, target: tuple) -> bool:
    """Whether `shape` broadcasts to exactly `target`. Plain sizes are compared here (~0.5 µs);
    torch.broadcast_shapes took ~20 µs a call, a quarter of a one-token MultiheadAttention
    call with a key padding mask. Symbolic sizes (a graph being traced) go through it, which
    compares them without guarding on them."""
    if all(type(d) is int for d in (*shape, *target)):
        return len(shape) <= len(target) and all(
            d == 1 or d == t for d, t in zip(reversed(shape), reversed(target)))
    try:
        return torch.broadcast_shapes(shape, target) == tuple(target)
    except RuntimeError:
        return False


def _fits_in_place(m: Tensor, s: Tensor) -> bool:
    """Whether s may take m in place: m broadcasts to s's shape without growing it, and no
    torch.func transform runs (under vmap a batched m cannot go into an unbatched s)."""
    # (compiled: out of place, which Inductor fuses anyway; dynamo cannot tell a batched m)
    return (not torch.compiler.is_compiling() and broadcasts_to(tuple(m.shape), tuple(s.shape))
            and not torch._C._are_functorch_transforms_active())


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor,
                                 attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                                 scale: Optional[float] = None, enable_gqa: bool = False, *,
                                 window: Optional[int] = None,
                                 key_lengths: Optional[Tensor] = None,
                                 causal_alignment: str = "top_left",
                                 dropout_p: float = 0.0,
                                 dropout_mask: Optional[Tensor] = None) -> Tensor:
    """softmax(scale·QKᵀ + masks)·V; GQA by sharing each key/value head among Hq/Hkv query heads.

    ``dropout_p`` drops attention weights and scales the rest by 1/(1 − p): where
    ``dropout_mask`` (True = kept, broadcastable to the weights) is given it decides which,
    otherwise ``torch.nn.functional.dropout`` draws them.
    """
    p = attention_weights(q, k, attn_mask, is_causal, scale, enable_gqa, window=window,
                          key_lengths=key_lengths, causal_alignment=causal_alignment)
    if dropout_p > 0 and dropout_mask is not None:
        p = p * dropout_mask / (1.0 - dropout_p) if dropout_p < 1 else p * 0.0
    elif dropout_p > 0:
        p = torch.nn.functional.dropout(p, dropout_p, training=True)
    squeeze = v.dim() == 3
    if squeeze:
        v = v.unsqueeze(1)
        p = p.unsqueeze(1)
    Hq, Hkv = p.shape[1], v.shape[1]
    if Hq != Hkv:
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    out = p @ v
    return out.squeeze(1) if squeeze else out


# ---------------------------------------------------------------- streaming form ------------

def kv_cache_append(cache: Optional[tuple[Tensor, Tensor]], k_new: Tensor,
                    v_new: Tensor) -> tuple[Tensor, Tensor]:
    """The attention state: all keys and values seen so far, (B, Hkv, L, D) each."""
    if cache is None:
        return k_new, v_new
    return torch.cat([cache[0], k_new], dim=-2), torch.cat([cache[1], v_new], dim=-2)


def decode_step(q_new: Tensor, k_new: Tensor, v_new: Tensor,
                cache: Optional[tuple[Tensor, Tensor]], *, scale: Optional[float] = None,
                window: Optional[int] = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Appends a chunk of Lc ≥ 1 new positions to the cache and attends its queries causally to
    everything cached (bottom-right alignment: the chunk is the end of the sequence).

    Running a sequence in chunks of any sizes this way equals one causal call over all of it.
    """
    cache = kv_cache_append(cache, k_new, v_new)
    out = scaled_dot_product_attention(q_new, cache[0], cache[1], is_causal=True, scale=scale,
                                       enable_gqa=True, window=window,
                                       causal_alignment="bottom_right")
    return out, cache
