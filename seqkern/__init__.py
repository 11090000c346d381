"""seqkern: fused kernels for recurrent, attention and dilated-convolution sequence models."""
__version__ = "0.1.0"

from seqkern.registry import BackendUnavailableError, availability, select, use_backend
from seqkern import ops, nn, reference  # noqa: E402  (ops registers the backends it has)

__all__ = ["__version__", "use_backend", "select", "availability", "BackendUnavailableError",
           "ops", "nn", "reference"]
