"""Plain-PyTorch reference models: explicit per-step loops written for clarity. They define what
every kernel must compute (see SPEC.md) and are the fallback when no compiled backend runs."""
from seqkern.reference import attention, conv, rnn  # noqa: F401
