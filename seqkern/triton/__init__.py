"""Triton kernels (GPU; CPU tensors under TRITON_INTERPRET=1), one module per op family:
``rnn``, ``attention``, ``conv``, with the shared Triton math in ``common``.

This package itself never imports triton, so ``import seqkern`` works without it. The ops
modules call ``install`` once at import: when triton is installed it registers the "triton"
backend for the family and makes the family's torch.library custom ops launch the Triton
kernels for CUDA tensors (the kernel modules are imported on first use).

Whether triton can actually run here (a CUDA device, or TRITON_INTERPRET=1) is
``registry.availability("triton")``'s question, asked at call time.

Note: ``triton.jit`` decides at decoration time whether a kernel is compiled or interpreted, so
TRITON_INTERPRET=1 must be set before the first ``seqkern.triton.<family>`` import.
"""
from __future__ import annotations

import importlib
import importlib.util

from seqkern import registry

__all__ = ["importable", "install"]


def importable() -> bool:
    """Is triton installed? (Found on the path; the import itself is deferred: it costs ~0.3 s
    and most CPU-only sessions never launch a kernel.)"""
    return importlib.util.find_spec("triton") is not None


def _lazy(module: str, name: str):
    def call(*args, **kwargs):
        return getattr(importlib.import_module(f"seqkern.triton.{module}"), name)(*args, **kwargs)

    call.__name__ = f"triton_{module}_{name}"
    return call


def _conv_cuda(x, weight, bias, initial_state, dilation, groups, activation, save_preact):
    from seqkern.ops.conv import _SILU
    from seqkern.triton import conv

    act = {0: None, 1: "relu", 2: "silu", 3: "tanh"}[activation]
    y, pre = conv.conv_forward(x, weight, bias, initial_state, dilation, groups, act,
                               save_preact and activation == _SILU)
    return y, pre.to(registry.compute_dtype(x.dtype))


def _conv_backward_cuda(grad_y, x, weight, initial_state, y, preact, dilation, groups,
                        activation, has_bias):
    from seqkern.triton import conv

    act = {0: None, 1: "relu", 2: "silu", 3: "tanh"}[activation]
    d = conv._activation_grad(grad_y, y, preact.float(), act)
    dx, dw, dinit = conv.conv_input_weight_grad(d, x, weight, initial_state, dilation, groups)
    empty = x.new_empty((0,))
    return (dx, dw, d.sum((0, 2)).to(weight.dtype) if has_bias else empty,
            dinit if dinit is not None else empty)


def _attention_cuda(q, k, v, attn_mask, key_lengths, is_causal, bottom_right, window, scale,
                    dropout_p, dropout_seed, out_fp32=False):
    from seqkern.triton import attention

    out, lse = attention.attention_forward(q, k, v, attn_mask, key_lengths, is_causal,
                                           bottom_right, window, scale, dropout_p, dropout_seed,
                                           out_dtype=registry.compute_dtype(q.dtype) if out_fp32
                                           else None)
    return out, lse.double()  # the op's contract; the Triton kernels keep it in float32


def _attention_backward_cuda(grad_out, q, k, v, out, lse, attn_mask, key_lengths, is_causal,
                             bottom_right, window, scale, dropout_p, dropout_seed, mask_grad):
    from seqkern.triton import attention

    # (a float32 grad_out comes from rounding a float32 out: its values are q's dtype's)
    dq, dk, dv, dm = attention.attention_backward(grad_out.to(q.dtype), q, k, v, out, lse.float(), attn_mask,
                                                  key_lengths, is_causal, bottom_right, window,
                                                  scale, dropout_p, dropout_seed, mask_grad)
    return dq, dk, dv, dm if dm is not None else q.new_empty((0,))


def _wavenet_cuda(x, conv_weight, conv_bias, skip_weight, skip_bias, res_weight, res_bias,
                  initial_state, dilation, save):
    from seqkern.triton import conv

    res, skip, h = conv.wavenet_forward(x, conv_weight, conv_bias, skip_weight, skip_bias,
                                        res_weight, res_bias, initial_state, dilation, save)
    return res, skip, h.to(registry.compute_dtype(x.dtype))


def install(family: str, *ops) -> None:
    """Register the triton backend of ``family`` and the CUDA kernels of its custom ops
    (``ops`` in the order the family's ops module declares them)."""
    if not importable():
        return
    registry.register(family, "triton")
    if family == "rnn":
        forward, backward = ops
        forward.register_kernel("cuda")(_lazy("rnn", "recurrent_forward"))
        backward.register_kernel("cuda")(_lazy("rnn", "recurrent_backward"))
    elif family == "attention":
        forward, backward = ops
        forward.register_kernel("cuda")(_attention_cuda)
        backward.register_kernel("cuda")(_attention_backward_cuda)
    elif family == "conv":
        conv_op, conv_backward, wavenet, wavenet_backward = ops
        conv_op.register_kernel("cuda")(_conv_cuda)
        conv_backward.register_kernel("cuda")(_conv_backward_cuda)
        wavenet.register_kernel("cuda")(_wavenet_cuda)
        wavenet_backward.register_kernel("cuda")(_lazy("conv", "wavenet_backward"))
    else:
        raise ValueError(f"unknown family {family!r}")
