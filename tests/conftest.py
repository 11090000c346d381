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


def triton_interpreter_or_skip():
    """Called at the top of each Triton interpreter test module, before it imports kernels.

    With a GPU the session compiles the kernels (TRITON_INTERPRET is set above only on CPU-only
    machines) and tests/test_gpu.py runs the same checks on CUDA tensors, so these modules
    skip. Triton fixes interpreted-vs-compiled at its first import, which `import seqkern`
    (via torch._dynamo) already did: a wrong setup fails here, loudly, rather than skipping."""
    if torch.cuda.is_available():
        pytest.skip("interpreter tests run on CPU-only machines", allow_module_level=True)
    # (an install without the gpu extra: `pip install -e ".[test]"`; `make test` has triton)
    pytest.importorskip("triton", reason="triton is not installed (the gpu extra)")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from seqkern.triton.common import interpreter_ready

    assert interpreter_ready(), ("triton was imported before TRITON_INTERPRET=1 was set; set it "
                                 "in tests/conftest.py before importing seqkern, or in the "
                                 "environment")


@pytest.fixture(autouse=True)
def _triton_interpreter(request, monkeypatch):
    # a test may have cleared the variable; the interpreter tests need it at launch time
    if request.node.get_closest_marker("triton") is not None and not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


requires_cpu_ext = pytest.mark.skipif(
    not seqkern.availability("cpu")[0], reason="C++ extension not built")
