"""`seqkern info` and `seqkern bench` (also `python -m seqkern ...`)."""
from __future__ import annotations

import argparse
import os
import platform
import sys


def info() -> int:
    import torch

    import seqkern
    from seqkern import _ext, registry

    print(f"seqkern {seqkern.__version__}")
    print(f"torch   {torch.__version__}")
    try:
        import triton

        print(f"triton  {triton.__version__}")
    except ImportError:
        print("triton  not installed (pip install 'seqkern[gpu]')")
    print(f"python  {platform.python_version()} on {platform.machine()}")
    if _ext._C is not None:
        print(f"extension: built for {_ext._C.build_isa()} (uses: {_ext._C.required_cpu_flags().strip()}); "
              f"BLAS {_ext._C.blas()}")
    else:
        print(f"extension: not loaded: {_ext.load_error}")
    flags = _ext.cpu_flags()
    feats = {"AVX2": "avx2", "AVX-512": "avx512f", "AVX512_BF16": "avx512_bf16", "AMX": "amx_tile"}
    print("CPU features: " + ", ".join(f"{k}={'yes' if v in flags else 'no'}" for k, v in feats.items())
          + f"; torch CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"threads: {torch.get_num_threads()} (os.cpu_count()={os.cpu_count()})")
    if torch.cuda.is_available():
        print(f"CUDA: {torch.cuda.get_device_name(0)}")
    else:
        print("CUDA: no device")
    for b in registry.BACKENDS:
        ok, why = registry.availability(b)
        print(f"backend {b:<9} {'available' if ok else 'unavailable'}: {why}")
    forced = os.environ.get("SEQKERN_BACKEND")
    print("op family -> backend for CPU tensors" + (f" (SEQKERN_BACKEND={forced})" if forced else ""))
    for fam, be in registry.table().items():
        print(f"  {fam:<10} {be}   (implemented: {', '.join(sorted(registry.implemented(fam)))})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="seqkern", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, extension build, CPU features, backend per op family")
    b = sub.add_parser("bench", help="time seqkern against torch.nn and the reference")
    g = b.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the small grid (default; ~2 min)")
    g.add_argument("--full", action="store_true", help="every shape, more repetitions")
    b.add_argument("--ops", default=None,
                   help="comma-separated suites (e.g. lstm,gru,rnn,attention,conv); default all")
    b.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    b.add_argument("--no-reference", action="store_true", help="skip timing the reference")
    b.add_argument("suite", nargs="?", default=None, help="one suite name (same as --ops NAME)")
    args = p.parse_args(argv)
    if args.cmd == "info":
        return info()
    from seqkern.bench import harness

    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    ops = [o.strip() for o in args.ops.split(",") if o.strip()] if args.ops is not None else None
    if args.suite:
        ops = (ops or []) + [args.suite]
    return harness.main(ops, args.full, args.json, args.threads, not args.no_reference)


if __name__ == "__main__":
    sys.exit(main())
