"""Weight-recomputing hooks for the fused paths.

Old-style ``torch.nn.utils.weight_norm``, ``spectral_norm`` and ``torch.nn.utils.prune`` keep a
module's ``weight`` up to date in a forward pre-hook, which only ``module(...)`` runs. The fused
paths read weights without that call: ``step()`` methods, and ``WaveNetBlock``, whose ``conv``,
``skip`` and ``res`` run as one op. ``refresh_weights`` runs exactly those hooks (not arbitrary
user hooks, which expect a forward's inputs), so the weights such a path reads are current.
(The ``torch.nn.utils.parametrizations`` versions recompute on access and need nothing.)
"""
from __future__ import annotations

from torch import nn
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

_WEIGHT_HOOKS = (WeightNorm, SpectralNorm, BasePruningMethod)


def refresh_weights(module: nn.Module) -> None:
    hooks = module._forward_pre_hooks
    if hooks:  # empty for almost every module: one dict check per call
        for hook in list(hooks.values()):
            if isinstance(hook, _WEIGHT_HOOKS):
                hook(module, ())
