import os

import torch

if not torch.cuda.is_available():
    # Triton decides interpreted-vs-compiled at its first import, which `import seqkern` already
    # triggers (through torch._dynamo); the Triton tests run on CPU tensors under the
    # interpreter, so the variable must be set before that import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import seqkern  # noqa: E402


def pytest_report_header(config):
    from seqkern import _ext, registry

    return [f"seqkern {seqkern.__version__}, torch {torch.__version__}, "
            f"extension: {'built for ' + _ext._C.build_isa() if _ext._C else _ext.load_error}",
            f"backends: {registry.table()}"]


def stable_seed(*parts) -> int:
    """A per-case seed that is the same in every run (Python's hash() of strings is salted per
    process, which made randomly generated cases differ between runs)."""
    import zlib

    return zlib.crc32(repr(parts).encode())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


requires_cpu_ext = pytest.mark.skipif(
    not seqkern.availability("cpu")[0], reason="C++ extension not built")
