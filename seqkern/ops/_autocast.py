"""torch.autocast for seqkern's ops and modules, with torch's own rules for its counterparts.

Under ``torch.autocast(device)``, torch runs convolutions, ``scaled_dot_product_attention`` and
its recurrent layers in the autocast dtype (bfloat16 by default on the CPU, float16 on CUDA):
every floating-point tensor argument on that device except float64 is cast to it. Custom ops
are not in autocast's lists, so without this a ``seqkern.nn.LSTM`` after an autocast
``nn.Linear`` received a bfloat16 input beside float32 weights and raised a dtype error, where
``torch.nn.LSTM`` ran in bfloat16. The ops below cast the same way and then run with autocast
off, so the reference backend's own torch ops are not cast a second time.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

_DEVICES = ("cpu", "cuda")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast asks for on ``device``, or None when autocast is off there."""
    if device.type not in _DEVICES or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def cast(obj, dtype: torch.dtype, device_type: str):
    """obj with each floating-point tensor on ``device_type`` other than float64 cast to dtype
    (autocast's rule), through tuples, lists, dicts and PackedSequence."""
    if isinstance(obj, Tensor):
        if (obj.is_floating_point() and obj.dtype != torch.float64 and obj.dtype != dtype
                and obj.device.type == device_type):
            return obj.to(dtype)
        return obj
    if isinstance(obj, torch.nn.utils.rnn.PackedSequence):
        return obj._replace(data=cast(obj.data, dtype, device_type))
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple: fields positional
        return type(obj)(*(cast(o, dtype, device_type) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(cast(o, dtype, device_type) for o in obj)
    if isinstance(obj, dict):
        return {k: cast(v, dtype, device_type) for k, v in obj.items()}
    return obj


def _first_tensor(obj) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, torch.nn.utils.rnn.PackedSequence):
        return obj.data
    if isinstance(obj, (tuple, list)):
        for o in obj:
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def run(fn, *args, **kwargs):
    """fn(*args, **kwargs), with the floating-point arguments cast to the autocast dtype of the
    first tensor argument's device (positional, else keyword) and autocast off inside when
    autocast is on there; a plain call otherwise."""
    if not torch._C._is_any_autocast_enabled():  # 0.1 µs; finding the device first cost 1.5
        return fn(*args, **kwargs)
    t = _first_tensor(args)
    if t is None and kwargs:
        t = _first_tensor(tuple(kwargs.values()))
    dtype = autocast_dtype(t.device) if t is not None else None
    if dtype is None:
        return fn(*args, **kwargs)
    dev = t.device.type
    with torch.autocast(dev, enabled=False):
        return fn(*cast(args, dtype, dev), **cast(kwargs, dtype, dev))


def autocast_op(fn):
    """fn, run through ``run``: an op that casts for autocast as torch's own ops do."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return run(fn, *args, **kwargs)

    return wrapper
