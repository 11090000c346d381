"""Builds the C++ extension ``seqkern._C``.

The kernels are compiled for the instruction set of the machine that builds them
(``-march=native`` by default) and the extension records that ISA; at import time
``seqkern._ext`` refuses to load a build whose ISA the running CPU lacks, so a wheel
copied to an older CPU falls back to the reference path instead of crashing with SIGILL.
Set ``SEQKERN_ISA`` to ``avx512``, ``avx2`` or ``generic`` to build for another target.
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ISA_FLAGS = {
    "native": ["-march=native"],
    "avx512": ["-march=x86-64-v4", "-mavx512bf16"],
    "avx2": ["-march=x86-64-v3"],
    "generic": ["-march=x86-64"],
}


def isa_flags():
    isa = os.environ.get("SEQKERN_ISA", "native")
    if isa not in ISA_FLAGS:
        raise SystemExit(f"SEQKERN_ISA must be one of {sorted(ISA_FLAGS)}, got {isa!r}")
    flags = list(ISA_FLAGS[isa])
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        flags = ["-mcpu=native"] if isa == "native" else []
    return flags


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # csrc/isa.h maps the compiler's ISA macros onto ATen's CPU_CAPABILITY, so at::vec
    # uses 512-bit registers exactly when the compiler may emit AVX-512.
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno",
           "-Wno-unused-function", "-Wno-sign-compare"] + isa_flags()
    return CppExtension(
        name="seqkern._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
