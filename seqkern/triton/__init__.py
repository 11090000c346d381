"""Triton kernels (GPU; CPU tensors under TRITON_INTERPRET=1). See issue 6."""
