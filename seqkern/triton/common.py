"""Shared Triton math for every kernel family: gate functions, the accumulate-a-matmul-over-K
helper, and the online-softmax update. One module, so a numerical fix lands everywhere.

Importing this module imports triton; the package ``seqkern.triton`` does not, so
``import seqkern`` works without triton installed.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """True when triton runs programs on CPU tensors (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact fp32 products ("ieee"): a recurrence multiplies the TF32 rounding
    error by T, and the reference comparisons are fp32-tight. bf16/fp16 use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def interpreter_ready() -> bool:
    """Were triton's own language functions (tl.zeros, tl.sum, ...) built for the interpreter?
    triton decides that once, when it is first imported, and torch._dynamo imports triton
    (so ``import seqkern`` does): TRITON_INTERPRET=1 must be set before that."""
    return type(tl.zeros).__name__ == "InterpretedFunction"


def check_device(*tensors) -> None:
    """Triton launches on CUDA tensors, or on CPU tensors only under the interpreter; the
    kernels accumulate in float32, so they refuse float64 rather than lose its precision
    (seqkern.ops sends float64 to the reference backend)."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            raise NotImplementedError("seqkern triton kernels compute in float32 and do not take "
                                      "float64 inputs; seqkern.ops runs float64 on the reference "
                                      "backend")
        if t is not None and t.device.type == "cpu":
            if not interpreting():
                raise RuntimeError("seqkern triton kernels need CUDA tensors (or "
                                   "TRITON_INTERPRET=1 for CPU tensors)")
            if not interpreter_ready():
                raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported (torch "
                                   "imports it with `import seqkern`); set it in the "
                                   "environment before the process imports torch/seqkern")
            if t.dtype == torch.bfloat16:
                # the interpreter's tl.dot multiplies bf16 bit patterns as integers
                # (triton-lang/triton#11584): refuse rather than return garbage
                raise NotImplementedError("seqkern triton kernels: the Triton interpreter "
                                          "cannot compute bfloat16 products; use float32 under "
                                          "TRITON_INTERPRET=1 (bf16 runs on CUDA)")


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    # 2σ(2x) − 1 saturates cleanly at ±1 for large |x| (no inf/inf), absolute error ~1e-7.
    return 2.0 * sigmoid(2.0 * x) - 1.0


@triton.jit
def dot_acc(acc, a_ptr, a_stride, a_rows, a_mask, w_ptr, stride_wk, stride_wc, cols, c_mask, K,
            PREC: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc (R, C) += A[a_rows, 0:K] @ W[0:K, cols], where A is row-major with row stride
    a_stride and W[k, c] lives at w_ptr + k*stride_wk + c*stride_wc (so W or Wᵀ of a row-major
    matrix is read in place). K is walked in BLOCK_K chunks; masked lanes contribute 0."""
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < K
        a = tl.load(a_ptr + a_rows[:, None] * a_stride + kk[None, :],
                    mask=a_mask[:, None] & km[None, :], other=0.0)
        w = tl.load(w_ptr + kk[:, None] * stride_wk + cols[None, :] * stride_wc,
                    mask=km[:, None] & c_mask[None, :], other=0.0)
        acc += tl.dot(a.to(w.dtype), w, input_precision=PREC)
    return acc


@triton.jit
def online_softmax_update(m_i, l_i, acc, s):
    """One key tile of the streaming softmax. s (M, N) are base-2 logits with -inf where masked;
    returns the new running max m, normaliser l, the rescaled accumulator and p = 2^(s − m).

    A row that has seen only masked keys keeps m = -inf; its p and l stay 0 (no NaN), which is
    how fully masked rows come out as zeros."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    return m_new, l_new, acc * alpha[:, None], p
