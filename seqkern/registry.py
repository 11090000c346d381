"""The one place that decides which backend runs an op.

Backends:
  ``cpu``        the C++ kernels in ``seqkern._C`` (CPU tensors);
  ``triton``     the Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
  ``reference``  the plain PyTorch models in ``seqkern.reference`` (any device).

Choice, first match wins: the innermost ``use_backend(name)`` context, the ``SEQKERN_BACKEND``
environment variable, then automatic (CUDA tensors → triton, CPU tensors → cpu; reference when
the preferred backend is unavailable or does not implement the op family).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from typing import Iterator

import torch
import torch.autograd.forward_ad as _forward_ad

BACKENDS = ("cpu", "triton", "reference")
FAMILIES = ("rnn", "attention", "conv")

# family -> backends that implement it; each ops module registers itself on import.
_implemented: dict[str, set[str]] = {f: {"reference"} for f in FAMILIES}
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("seqkern_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """A backend was requested that cannot run here."""


def register(family: str, backend: str) -> None:
    if family not in _implemented or backend not in BACKENDS:
        raise ValueError(f"unknown family/backend {family!r}/{backend!r}")
    _implemented[family].add(backend)


def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed (pip install 'seqkern[gpu]')"
    if torch.cuda.is_available():
        return True, "CUDA device present"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "TRITON_INTERPRET=1: Triton programs run on CPU tensors"
    return False, "no CUDA device, and TRITON_INTERPRET=1 is not set"


def availability(backend: str) -> tuple[bool, str]:
    """(available, reason) for a backend on this machine."""
    if backend == "reference":
        return True, "plain PyTorch"
    if backend == "cpu":
        from seqkern import _ext

        if _ext._C is None:
            return False, _ext.load_error or "extension not loaded"
        return True, f"C++ extension built for {_ext._C.build_isa()}"
    if backend == "triton":
        return _triton_status()
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def _is_available(backend: str) -> bool:
    """availability(backend)[0] without building the reason (select() runs on every op call)."""
    if backend == "cpu":
        ext = sys.modules.get("seqkern._ext")  # (an import statement here cost ~0.3 µs)
        if ext is None:
            from seqkern import _ext as ext
        return ext._C is not None
    return availability(backend)[0]


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every op inside the block on backend ``name``; raises if it cannot run here."""
    _check_name(name, "use_backend")
    ok, why = availability(name)
    if not ok:
        raise BackendUnavailableError(f"seqkern backend {name!r} is not available: {why}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


# os.environ.get of an unset variable raises and catches a KeyError inside (about 0.8 µs);
# select() reads SEQKERN_BACKEND on every op call, so it looks in the mapping's own dict
# (0.04 µs), which os.environ keeps in step with os.environ[...] = and del.
# (os.environ itself is looked up on each call: a test may replace it with a plain dict)
_Environ = type(os.environ)
_backend_key = os.environ.encodekey("SEQKERN_BACKEND") if hasattr(os.environ, "encodekey") else None


def _backend_env() -> str:
    env = os.environ
    if type(env) is _Environ and _backend_key is not None:
        raw = env._data.get(_backend_key)
        return "" if raw is None else env.decodevalue(raw)
    return env.get("SEQKERN_BACKEND", "")


def requested() -> str | None:
    """The backend forced by use_backend() or SEQKERN_BACKEND, if any."""
    name = _forced.get()
    if name is not None:
        return name
    env = _backend_env().strip()
    if env and env != "auto":
        return _check_name(env, "SEQKERN_BACKEND")
    return None


# dtypes the kernels compute in; the others run on the reference. The cpu kernels compute
# bfloat16 and float16 in float32. The Triton kernels accumulate in float32, so a float64 input
# there would silently get float32 precision: it runs on the reference instead.
KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in for inputs of `dtype`, and keep what they save for the
    backward in: float32 for bfloat16 and float16, else the dtype itself. One rule for the
    custom ops' fakes and for every backend's kernels registered under them."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


@torch.compiler.assume_constant_result
def select(family: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The backend that runs `family` for tensors on `device` (of `dtype`, when given: a
    backend hands a dtype its kernels do not compute in, see KERNEL_DTYPES, to the reference).

    Under torch.compile the choice is made once, at trace time, and baked into the graph."""
    backend = _select_for_device(family, device)
    if dtype is not None and dtype not in KERNEL_DTYPES.get(backend, (dtype,)):
        return "reference"
    if torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0:
        # torch.func.grad / jvp / vmap: a custom op's registered autograd cannot run under
        # functorch's grad transforms (torch raises), while the reference's torch ops can, as
        # torch's own LSTM and SDPA do (per-sample gradients, MAML-style functional_call).
        # Inside forward_ad.dual_level() the kernels would drop a dual input's tangent (a
        # kernel computes on the primal only); the reference propagates it.
        return "reference"
    return backend


def _select_for_device(family: str, device: torch.device | str) -> str:
    if not isinstance(device, torch.device):
        device = torch.device(device)
    forced = requested()
    if forced is not None:
        ok, why = availability(forced)
        if not ok:
            raise BackendUnavailableError(f"seqkern backend {forced!r} is not available: {why}")
        if forced not in _implemented[family]:
            raise BackendUnavailableError(
                f"seqkern backend {forced!r} does not implement the {family} ops yet")
        if forced == "cpu" and device.type != "cpu":
            raise BackendUnavailableError(f"seqkern backend 'cpu' cannot run {device} tensors")
        return forced
    preferred = "triton" if device.type == "cuda" else "cpu" if device.type == "cpu" else None
    if preferred is not None and preferred in _implemented[family] and _is_available(preferred):
        return preferred
    if preferred == "cpu":
        from seqkern import _ext

        _ext.warn_fallback_once()
    return "reference"


def table() -> dict[str, str]:
    """family -> backend chosen for CPU tensors right now (for `seqkern info`)."""
    out = {}
    for fam in FAMILIES:
        try:
            out[fam] = select(fam, "cpu")
        except (BackendUnavailableError, ValueError) as e:  # (ValueError: a bad SEQKERN_BACKEND)
            out[fam] = f"error: {e}"
    return out


def implemented(family: str) -> set[str]:
    return set(_implemented[family])
