from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Case:
    """One benchmark row: the same computation done by several implementations.

    ``make()`` builds inputs once and returns ``{impl: fn}`` with zero-argument callables; the
    keys are "seqkern", "torch" and optionally "reference" (left out where it would take
    minutes). ``flops`` (per call) turns seqkern's median time into GFLOP/s; ``bytes`` into GB/s.
    """

    suite: str                      # selects the case with --ops (e.g. "lstm", "attention")
    op: str                         # what is measured, e.g. "lstm fwd", "lstm fwd+bwd"
    shape: dict                     # shown in the table, e.g. {"T": 50, "B": 1, "I": 128, "H": 128}
    dtype: torch.dtype
    make: Callable[[], dict[str, Callable[[], object]]]
    flops: float | None = None
    bytes: float | None = None
    quick: bool = True              # part of the --quick grid
    extra: dict = field(default_factory=dict)

    @property
    def shape_str(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape.items())
