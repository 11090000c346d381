"""Loads the compiled extension ``seqkern._C`` if it is usable on this CPU.

A missing or unusable extension is not an error: the registry then routes every op to the
reference (or Triton) implementation, and one warning says why.
"""
from __future__ import annotations

import platform
import warnings

_C = None
load_error: str | None = None


def _cpu_flags() -> set[str] | None:
    if platform.system() != "Linux":
        return None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def cpu_flags() -> set[str]:
    return _cpu_flags() or set()


def _load():
    global _C, load_error
    import importlib.util

    if importlib.util.find_spec("seqkern._C") is None:
        load_error = ("the C++ extension seqkern._C is not built (pip install "
                      "--no-build-isolation -e . builds it)")
        return
    try:
        from seqkern import _C as ext  # noqa: N811
    except ImportError as e:  # built against another torch, or a broken file
        load_error = f"the C++ extension seqkern._C failed to import ({e})"
        return
    flags = _cpu_flags()
    if flags is not None:
        missing = [f for f in ext.required_cpu_flags().split() if f not in flags]
        if missing:
            load_error = (
                f"seqkern._C was compiled for {ext.build_isa()} and uses CPU features this "
                f"CPU lacks ({', '.join(missing)}); rebuild on this machine "
                "(pip install --no-build-isolation --force-reinstall .) or set SEQKERN_ISA"
            )
            return
    _C = ext


_load()
_warned = False


def warn_fallback_once() -> None:
    global _warned
    if load_error is not None and not _warned:
        _warned = True
        warnings.warn(f"seqkern: {load_error}; using the reference implementation on the CPU",
                      RuntimeWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """warnings.warn's stacklevel of the first frame outside seqkern and torch (the user's
    call, whatever the depth of seqkern's and torch's calls in between: nn.Module.__call__)."""
    import os
    import sys

    pkgs = [os.path.dirname(os.path.abspath(__file__))]
    if "torch" in sys.modules and getattr(sys.modules["torch"], "__file__", None):
        pkgs.append(os.path.dirname(os.path.abspath(sys.modules["torch"].__file__)))
    prefixes = tuple(p + os.sep for p in pkgs)
    frame, level = sys._getframe(2), 2  # (2: warn_fallback_once's caller)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(prefixes):
        frame, level = frame.f_back, level + 1
    return level


def needs_grad(*tensors) -> bool:
    """Whether autograd must record an op on these tensors (None entries are skipped). Always
    under torch.jit.trace: the trace records the answer (an op's `save`) as a constant, the
    traced graph may later run with gradients, and jit.trace's own check re-traces under
    no_grad, where an answer that followed the grad mode would differ."""
    import torch

    # (torch.compile folds is_compiling() to True; it cannot trace _is_tracing())
    if not torch.compiler.is_compiling() and torch._C._is_tracing():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def is_fake(t) -> bool:
    """Whether t is a FakeTensor (FakeTensorMode, make_fx's symbolic tracing): its data cannot
    be read, so a data-dependent step must go through an op whose fake handles it, or take no
    branch on a size."""
    import torch
    from torch._subclasses.fake_tensor import is_fake as _is_fake

    return isinstance(t, torch.Tensor) and _is_fake(t)  # (sees through functionalization)


def batched(*tensors) -> bool:
    """Whether a tensor is a vmap-batched one, as the gradients reaching a backward are under
    autograd.grad(is_grads_batched=True) or jacobian(vectorize=True): only a custom op, not the
    C++ kernel, can take those (they have no storage)."""
    import torch

    F = torch._C._functorch
    return any(t is not None and (F.is_legacy_batchedtensor(t) or F.is_batchedtensor(t))
               for t in tensors)


def _only_default_device_mode() -> bool:
    """Whether the one function mode active is torch.set_default_device's (or a `with
    torch.device(...)` block's): it only fills in the device of factory calls, and seqkern's
    fast paths name their devices, so they may run under it (without this a script that set a
    default device ran LSTMCell at 99 µs a call instead of 14, torch's at 31)."""
    import torch
    from torch.utils._device import DeviceContext

    C = torch._C
    return C._len_torch_function_stack() == 1 and isinstance(C._get_function_stack_at(0), DeviceContext)


def direct_call_ok(*tensors) -> bool:
    """Whether an op may call its C++ kernel directly, or through a plain autograd.Function,
    instead of its registered custom op: in eager mode only, on plain tensors, with no graph
    being traced (torch.compile, jit.trace, make_fx), no torch.func transform and no dispatch or
    function mode (FakeTensorMode, FlopCounterMode, ...) active. Those all need the custom op,
    which costs tens of microseconds of Python dispatch per call; this check costs about 1."""
    import torch  # (seqkern imports torch first; this is a dict lookup)

    C = torch._C
    if (torch.compiler.is_compiling() or C._is_tracing() or C._len_torch_dispatch_stack()
            or C._are_functorch_transforms_active()
            or (C._is_torch_function_mode_enabled() and not _only_default_device_mode())):
        return False
    for t in tensors:
        if t is not None and type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
            return False
    return True
