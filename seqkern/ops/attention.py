"""Attention ops: ``scaled_dot_product_attention`` (a drop-in for torch's, plus sliding window,
key lengths and bottom-right causal alignment) and the custom ops behind it."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from seqkern import _ext, registry
from seqkern import triton as _triton_backend  # does not import triton itself
from seqkern.ops._autocast import autocast_op
from seqkern.reference import attention as ref

__all__ = ["scaled_dot_product_attention", "dropout_keep_mask"]



# ---------------------------------------------------------------- custom ops (C++ CPU) -----

@torch.library.custom_op("seqkern::attention_forward", mutates_args=(), device_types="cpu")
def _attention_forward_op(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
                          key_lengths: Optional[Tensor], is_causal: bool, bottom_right: bool,
                          window: int, scale: float, dropout_p: float,
                          dropout_seed: Optional[Tensor],
                          out_fp32: bool = False) -> tuple[Tensor, Tensor]:
    """q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) -> (out (B, Hq, Lq, Dv),
    log-sum-exp (B, Hq, Lq) in float64 for every input dtype; -inf for rows with no allowed
    key). float64 because the backward recomputes each weight as exp(score - lse): with peaked
    scores (|lse| in the tens) a float32 lse would put an error of up to 2e-6 on every weight of
    the row, 20x that of the forward's own weights.
    With ``dropout_p`` > 0 the weights are dropped by the pattern ``dropout_keep_mask`` gives for
    ``dropout_seed`` (a one-element int64 tensor); the log-sum-exp is that of the undropped
    weights.
    With ``out_fp32``, a bfloat16 or float16 ``out`` comes in float32, unrounded: what the
    backward wants for Δ = rowsum(dO ⊙ O), where rounding O would cost accuracy (callers that
    train round their copy for the user)."""
    out, lse = _ext._C.attention_forward(q, k, v, attn_mask, key_lengths, is_causal,
                                         bottom_right, window, scale, dropout_p, dropout_seed,
                                         out_fp32)
    return out, lse


@_attention_forward_op.register_fake
def _(q, k, v, attn_mask, key_lengths, is_causal, bottom_right, window, scale, dropout_p,
      dropout_seed, out_fp32=False):
    B, Hq, Lq, _ = q.shape
    return (q.new_empty((B, Hq, Lq, v.shape[-1]),
                        dtype=registry.compute_dtype(q.dtype) if out_fp32 else q.dtype),
            q.new_empty((B, Hq, Lq), dtype=torch.float64))


def _mask_grad_shape(attn_mask: Tensor) -> tuple:
    return (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)


@torch.library.custom_op("seqkern::attention_backward", mutates_args=(), device_types="cpu")
def _attention_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                           lse: Tensor, attn_mask: Optional[Tensor],
                           key_lengths: Optional[Tensor], is_causal: bool, bottom_right: bool,
                           window: int, scale: float, dropout_p: float,
                           dropout_seed: Optional[Tensor],
                           mask_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dq, dk, dv, d attn_mask); scores are recomputed tile by tile from lse. The mask's
    gradient (additive masks, when ``mask_grad``) has the mask's shape with leading 1s up to 4
    dims, summed over the dims the mask broadcasts along; otherwise it is empty."""
    return tuple(_ext._C.attention_backward(grad_out, q, k, v, out, lse, attn_mask, key_lengths,
                                            is_causal, bottom_right, window, scale, dropout_p,
                                            dropout_seed, mask_grad))


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, attn_mask, key_lengths, is_causal, bottom_right, window, scale,
      dropout_p, dropout_seed, mask_grad):
    dmask = (attn_mask.new_empty(_mask_grad_shape(attn_mask)) if mask_grad
             else q.new_empty((0,)))
    # contiguous, as the kernels return them (empty_like would keep a strided view's layout)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def _saveable(t: Optional[Tensor]) -> Optional[Tensor]:
    """t, or a copy if it is an inference tensor (a mask or key lengths built under
    torch.inference_mode), which save_for_backward refuses; torch's own SDPA accepts one."""
    if t is not None and t.is_inference():
        with torch.inference_mode(False):
            return t.clone()
    return t


def _setup_context(ctx, inputs, output):
    (q, k, v, attn_mask, key_lengths, is_causal, bottom_right, window, scale, dropout_p,
     dropout_seed, *_out_fp32) = inputs
    out, lse = output
    ctx.args = (is_causal, bottom_right, window, scale, dropout_p)
    ctx.save_for_backward(q, k, v, out, lse, _saveable(attn_mask), _saveable(key_lengths),
                          dropout_seed)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    return _backward_with(_attention_backward_op, ctx, grad_out)


def _backward_with(backward_fn, ctx, grad_out):
    if torch.is_grad_enabled():
        raise RuntimeError("seqkern.scaled_dot_product_attention: double backward (create_graph="
                           "True) is not supported by the cpu backend; use "
                           "seqkern.use_backend('reference') for higher-order gradients")
    q, k, v, out, lse, attn_mask, key_lengths, dropout_seed = ctx.saved_tensors
    mask_grad = bool(ctx.needs_input_grad[3])
    dq, dk, dv, dmask = backward_fn(grad_out.contiguous(), q, k, v, out, lse, attn_mask,
                                    key_lengths, *ctx.args, dropout_seed, mask_grad)
    dmask = dmask.view(attn_mask.shape) if mask_grad else None
    return dq, dk, dv, dmask, None, None, None, None, None, None, None, None


_attention_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The custom op's kernels and backward for eager training, without its Python dispatch
    (~40 µs a call, more than the kernel for a decoding step). Where _ext.direct_call_ok says
    no (torch.compile, tracing, torch.func, dispatch modes), the custom op is used."""

    @staticmethod
    def forward(ctx, *inputs):
        out, lse = _ext._C.attention_forward(*inputs)
        _setup_context(ctx, inputs, (out, lse))
        # a float32 output (out_fp32, kept for the backward) is rounded for the caller here, in
        # C++: out.to() outside would map its result afresh on every training step
        if out.dtype != inputs[0].dtype:
            out = _ext._C.cast_like(out, inputs[0])
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        # batched gradients (is_grads_batched, jacobian(vectorize=True)) arrive under vmap,
        # which only the custom op can take
        direct = _ext.direct_call_ok(grad_out) and not _ext.batched(grad_out)
        return _backward_with(_ext._C.attention_backward if direct else _attention_backward_op,
                              ctx, grad_out)


if _ext._C is not None:
    registry.register("attention", "cpu")

# triton backend: registered (and the CUDA kernels of the two ops above) only if installed.
_triton_backend.install("attention", _attention_forward_op, _attention_backward_op)


# ---------------------------------------------------------------- dropout ------------------

def _draw_seed() -> Tensor:
    """A dropout seed from torch's default generator, so ``torch.manual_seed`` makes dropout
    reproducible; a tensor, so that ``torch.compile`` traces it."""
    return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device="cpu")


def dropout_keep_mask(shape, dropout_p: float, dropout_seed) -> Tensor:
    """The keep pattern (True = kept) attention dropout applies for this seed to weights of shape
    (B, H, Lq, Lk): the cpu kernels regenerate it tile by tile, this materialises it (for tests
    and the reference). dropout_seed: an int, or a one-element int64 tensor as the ops pass."""
    B, H, Lq, Lk = shape
    if isinstance(dropout_seed, int):
        dropout_seed = torch.tensor([dropout_seed], dtype=torch.int64)
    if _ext._C is None:
        raise RuntimeError(f"dropout_keep_mask needs seqkern's C++ extension, which is not "
                           f"loaded: {_ext.load_error}")
    return _ext._C.attention_dropout_mask(B, H, Lq, Lk, float(dropout_p), dropout_seed)


# ---------------------------------------------------------------- public API ---------------

def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def _check(q: Tensor, k: Tensor, v: Tensor, attn_mask, dropout_p, scale, enable_gqa, window,
           key_lengths, causal_alignment, is_causal) -> None:
    # The common decoding call first, in a few comparisons (the full checks below cost about
    # 3 µs, against 1.6 for a one-token step's kernel): all that _check_args would verify for
    # plain 4-D q, k, v with no optional argument.
    if (attn_mask is None and window is None and key_lengths is None and scale is None
            and isinstance(dropout_p, (int, float)) and dropout_p == 0.0
            and isinstance(q, Tensor) and isinstance(k, Tensor)
            and isinstance(v, Tensor) and q.is_floating_point()):
        qs, ks, vs = q.shape, k.shape, v.shape
        if (len(qs) == 4 and len(ks) == 4 and len(vs) == 4 and k.dtype == q.dtype == v.dtype
                and k.device == q.device == v.device and ks[3] == qs[3] and ks[:3] == vs[:3]
                and ks[0] == qs[0] and ks[1] and (qs[1] == ks[1] or enable_gqa and qs[1] % ks[1] == 0)
                and (causal_alignment == "top_left" or causal_alignment == "bottom_right")):
            return
    _check_args(q, k, v, attn_mask, dropout_p, scale, enable_gqa, window, key_lengths,
                causal_alignment, is_causal)


def _check_args(q: Tensor, k: Tensor, v: Tensor, attn_mask, dropout_p, scale, enable_gqa,
                window, key_lengths, causal_alignment, is_causal) -> None:
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.dim() not in (3, 4):
            raise ValueError(f"{name} must be (B, H, L, D) or (B, L, D), got shape {_shape(t)}")
    if not (q.dim() == k.dim() == v.dim()):
        raise ValueError(f"query, key, value must have the same number of dims, got "
                         f"{_shape(q)}, {_shape(k)}, {_shape(v)}")
    for name, t in (("key", k), ("value", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} dtype must match query's: expected {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on query's device: expected {q.device}, got {t.device}")
    if not q.is_floating_point():
        raise TypeError(f"query must be a floating-point tensor, got {q.dtype}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"key head dim must equal query's: expected {q.shape[-1]}, got "
                         f"{k.shape[-1]} (query {_shape(q)}, key {_shape(k)})")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"key and value must agree in all but the last dim: key {_shape(k)}, "
                         f"value {_shape(v)}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"key batch size must equal query's: expected {q.shape[0]}, got "
                         f"{k.shape[0]}")
    if q.dim() == 4:
        Hq, Hkv = q.shape[1], k.shape[1]
        if (Hkv == 0 and Hq != 0) or (Hkv and Hq % Hkv):  # (no heads at all: an empty result)
            raise ValueError(f"query heads must be a multiple of key/value heads: Hq={Hq}, "
                             f"Hkv={Hkv}")
        if Hq != Hkv and not enable_gqa:
            raise ValueError(f"query has {Hq} heads but key/value have {Hkv}; pass "
                             "enable_gqa=True for grouped-query attention")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p!r}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if causal_alignment not in ref.ALIGNMENTS:
        raise ValueError(f"causal_alignment must be one of {ref.ALIGNMENTS}, got "
                         f"{causal_alignment!r}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"window must be an int or None, got {type(window).__name__}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not is_causal:
            raise ValueError("window (a sliding window over past keys) requires is_causal=True")
    B, Lq, Lk = q.shape[0], q.shape[-2], k.shape[-2]
    if key_lengths is not None:
        if not isinstance(key_lengths, Tensor) or key_lengths.dtype.is_floating_point \
                or key_lengths.dtype == torch.bool or key_lengths.dim() != 1 \
                or key_lengths.shape[0] != B:
            raise ValueError(f"key_lengths must be a 1-D integer tensor of length {B}, got "
                             f"{key_lengths!r:.80}")
        # (not on a value being traced or vmapped, which has no data to test: the reference that
        # runs there reads a negative length as 0)
        if (not torch.compiler.is_compiling() and not _ext.batched(key_lengths)
                and bool((key_lengths < 0).any())):
            raise ValueError("key_lengths must be >= 0")
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be bool (True = allowed) or floating point "
                            f"(additive), got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask must be on query's device: expected {q.device}, got "
                             f"{attn_mask.device}")
        target = (B, q.shape[1], Lq, Lk) if q.dim() == 4 else (B, Lq, Lk)
        if not ref.broadcasts_to(_shape(attn_mask), target):
            raise ValueError(f"attn_mask of shape {_shape(attn_mask)} is not broadcastable to "
                             f"{target}")


@autocast_op
def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *, window: Optional[int] = None,
                                 key_lengths: Optional[Tensor] = None,
                                 causal_alignment: str = "top_left") -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` on (B, H, L, D) or
    (B, L, D) tensors; masks combine (SPEC "Causal masked attention"):

    - ``is_causal``: query i sees key j iff j ≤ i + δ, δ = 0 for ``causal_alignment="top_left"``
      (torch's convention) or Lk − Lq for ``"bottom_right"`` (decoding with a KV cache);
    - ``window`` (needs ``is_causal``): additionally j > i + δ − window;
    - ``key_lengths`` (B,): key j of batch b is allowed iff j < key_lengths[b];
    - ``attn_mask``: bool (True = allowed) or additive, broadcastable to (B, H, Lq, Lk).
      Unlike torch, it may be combined with ``is_causal``.

    Rows with no allowed key return zeros. ``value`` may have a head dim other than query's.
    The cpu backend runs float32, float64, bfloat16 and float16 (the last two computed in
    float32); other dtypes use the reference.

    ``dropout_p`` drops attention weights as torch does (always, not only in training), with a
    pattern drawn from torch's default generator: ``torch.manual_seed`` reproduces it, but it is
    not the pattern torch itself would draw. Under ``torch.compile`` the seed comes from
    Inductor's generator, so the pattern differs from eager's for the same manual seed (it is
    the same with ``torch._inductor.config.fallback_random = True``). An additive
    ``attn_mask`` that requires grad gets
    its gradient (summed over the dims it broadcasts along).
    """
    _check(query, key, value, attn_mask, dropout_p, scale, enable_gqa, window, key_lengths,
           causal_alignment, is_causal)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1]) if query.shape[-1] > 0 else 1.0
    backend = registry.select("attention", query.device, query.dtype)
    if query.shape[-1] == 0:  # no head dim: every score is 0, which only the reference handles
        backend = "reference"
    if backend != "reference":
        # Both kernels take (B, H, L, D) operands, int64 key lengths and the mask flags as
        # plain values.
        squeeze = query.dim() == 3
        q, k, v, m = query, key, value, attn_mask
        if squeeze:
            q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
            if m is not None and m.dim() == 3:
                m = m.unsqueeze(1)
        kl = key_lengths.to(device=q.device, dtype=torch.int64) if key_lengths is not None else None
        # a window past Lq + Lk rules nothing out: clamped, so any int fits the op's int64
        # (sym_min: under export with dynamic lengths, min() would specialise on them)
        window = torch.sym_min(int(window), q.shape[-2] + k.shape[-2] + 1) if window else 0
        flags = (bool(is_causal), causal_alignment == "bottom_right", window, float(scale))
        if backend == "triton":
            from seqkern.triton import attention as triton_attention

            p = float(dropout_p)
            out = triton_attention.attention(q, k, v, m, kl, *flags, p,
                                             _draw_seed() if p else None)
        else:
            p = float(dropout_p)
            # training: the output in the compute dtype (float32 for bf16/fp16) for the
            # backward's Δ, rounded here. (The decode kernel, ≤ 4 queries, sums Δ from its
            # weights and has no use for it, but asking by Lq would put a guard on the query
            # length into exported and compiled graphs.)
            train = _ext.needs_grad(q, k, v, m)
            args = (q, k, v, m, kl, *flags, p, _draw_seed() if p else None, train)
            if not _ext.direct_call_ok(q, k, v, m, kl):
                out, _ = _attention_forward_op(*args)
            elif train:
                out, _ = _EagerAttention.apply(*args)
            else:  # eager inference: nothing to record, so no dispatch at all (and no lse)
                out, _ = _ext._C.attention_forward(*args, need_lse=False)
            if out.dtype != q.dtype:
                out = out.to(q.dtype)
        return out.squeeze(1) if squeeze else out
    dtype = query.dtype
    if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.dtype != dtype:
        wide = torch.promote_types(dtype, attn_mask.dtype)
        if wide == dtype:
            attn_mask = attn_mask.to(dtype)  # the reference computes in query's dtype
        else:
            # A wider mask (fp32 with fp16 q) keeps its range: cast to fp16, a -1e30 padding row
            # became -inf (a row with no allowed key, zeros) and values past 65504 inf. The
            # reference computes in the mask's dtype then, as the kernels compute in fp32.
            query, key, value = query.to(wide), key.to(wide), value.to(wide)
    out = ref.scaled_dot_product_attention(query, key, value, attn_mask, bool(is_causal), scale,
                                           enable_gqa, window=window, key_lengths=key_lengths,
                                           causal_alignment=causal_alignment,
                                           dropout_p=dropout_p)
    return out.to(dtype)
