"""Times benchmark cases and prints the comparison table (used by `seqkern bench`)."""
from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
from typing import Callable, Iterable

import torch

from seqkern.bench.case import Case

FAMILY_MODULES = ("rnn", "attention", "conv")


def load_cases(full: bool) -> list[Case]:
    cases: list[Case] = []
    for fam in FAMILY_MODULES:
        try:
            mod = importlib.import_module(f"seqkern.bench.{fam}")
        except ImportError:
            continue
        if hasattr(mod, "cases"):
            cases.extend(mod.cases(full))
    return cases


def suites(cases: Iterable[Case]) -> list[str]:
    return sorted({c.suite for c in cases})


def _median(times: list[float]) -> float:
    times = sorted(times)
    n = len(times)
    return times[n // 2] if n % 2 else 0.5 * (times[n // 2 - 1] + times[n // 2])


def median_time(fn: Callable[[], object], min_runs: int, budget_s: float) -> tuple[float, int]:
    """Median wall time of fn over at least `min_runs` runs (more while within `budget_s`),
    after one warm-up call."""
    meds = median_times({"f": fn}, min_runs, budget_s)
    return meds["f"]


def median_times(fns: dict[str, Callable[[], object]], min_runs: int,
                 budget_s: float) -> dict[str, tuple[float, int]]:
    """Median wall time of each fn, the fns run in turn (a, b, a, b, ...) after one warm-up
    call each: on a shared machine whose speed drifts by tens of percent over seconds, timing
    one implementation after the other would bias their ratio; interleaved, the drift falls on
    both alike. At least `min_runs` rounds, more while within `budget_s` (per fn)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    budget = budget_s * len(fns)
    rounds = 0
    while rounds < min_runs or (time.perf_counter() - start < budget and rounds < 200):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
        rounds += 1
    return {k: (_median(v), len(v)) for k, v in times.items()}


def _progress(i: int, n: int, label: str) -> None:
    if not sys.stderr.isatty():
        return
    width = 30
    done = int(width * i / max(n, 1))
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {label[:50]:<50}")
    sys.stderr.flush()
    if i == n:
        sys.stderr.write("\n")


def run(cases: list[Case], full: bool, with_reference: bool = True, log=print) -> list[dict]:
    min_runs, budget = (10, 2.0) if full else (5, 0.6)
    rows = []
    threads = torch.get_num_threads()
    for i, case in enumerate(cases):
        _progress(i, len(cases), f"{case.op} {case.shape_str}")
        impls = case.make()
        row = {"suite": case.suite, "op": case.op, "shape": case.shape,
               "dtype": str(case.dtype).replace("torch.", ""), "threads": threads}
        timed = median_times({k: impls[k] for k in ("seqkern", "torch") if k in impls},
                             min_runs, budget)
        if "reference" in impls and with_reference:
            timed["reference"] = median_time(impls["reference"], 3, 0.0)
        for name in ("seqkern", "torch", "reference"):
            if name not in timed:
                row[f"{name}_ms"] = None
                continue
            med, n = timed[name]
            row[f"{name}_ms"] = med * 1e3
            row[f"{name}_runs"] = n
        s, t = row["seqkern_ms"], row["torch_ms"]
        row["speedup"] = (t / s) if s and t else None
        row["gflops"] = (case.flops / (s * 1e-3) / 1e9) if case.flops and s else None
        row["gbps"] = (case.bytes / (s * 1e-3) / 1e9) if case.bytes and s else None
        row["torch_gflops"] = (case.flops / (t * 1e-3) / 1e9) if case.flops and t else None
        if case.extra.get("note"):  # (what the comparison is: shown under the table)
            row["note"] = case.extra["note"]
        rows.append(row)
        del impls
    _progress(len(cases), len(cases), "done")
    return rows


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    head = ["op", "shape", "dtype", "thr", "seqkern ms", "torch ms", "ref ms", "speedup",
            "GFLOP/s", "torch GFLOP/s", "GB/s"]
    body = []
    for r in rows:
        shape = " ".join(f"{k}={v}" for k, v in r["shape"].items())
        body.append([r["op"], shape, r["dtype"], str(r["threads"]), _fmt(r["seqkern_ms"]),
                     _fmt(r["torch_ms"]), _fmt(r["reference_ms"]), _fmt(r["speedup"], ".2f") + "x",
                     _fmt(r["gflops"], ".1f"), _fmt(r["torch_gflops"], ".1f"), _fmt(r["gbps"], ".1f")])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    # geometric mean of speedups per (suite, op)
    groups: dict[str, list[float]] = {}
    for r in rows:
        if r["speedup"]:
            groups.setdefault(r["op"] + f" [{r['dtype']}]", []).append(r["speedup"])
    notes = {r["op"]: r["note"] for r in rows if r.get("note")}
    if notes:
        lines.append("")
        lines += [f"note, {op}: {note}" for op, note in notes.items()]
    if groups:
        lines.append("")
        lines.append("speedup vs torch (geo-mean / worst):")
        for k, v in groups.items():
            g = math.exp(sum(math.log(x) for x in v) / len(v))
            lines.append(f"  {k:<40} {g:6.2f}x  /  {min(v):.2f}x  over {len(v)} shapes")
    return "\n".join(lines)


def main(ops: list[str] | None, full: bool, json_path: str | None, threads: int | None,
         with_reference: bool = True) -> int:
    if threads is not None:
        torch.set_num_threads(threads)
    cases = [c for c in load_cases(full) if full or c.quick]
    known = suites(cases)
    if ops is not None and not ops:
        print(f"--ops names no suite; available: {', '.join(known)}", file=sys.stderr)
        return 2
    if ops:
        unknown = [o for o in ops if o not in known]
        if unknown:
            print(f"unknown suite(s) {', '.join(unknown)}; available: {', '.join(known)}",
                  file=sys.stderr)
            return 2
        cases = [c for c in cases if c.suite in ops]
    from seqkern import registry

    backends = registry.table()
    broken = {fam: be for fam, be in backends.items() if be.startswith("error:")}
    if broken:  # (before any case runs: each would raise the same error)
        for fam, be in broken.items():
            print(f"cannot benchmark {fam}: {be}", file=sys.stderr)
        return 2
    if json_path:
        # checked now (an unwritable path found after a full run would lose it), written at
        # the end through a temporary file (an interrupted run leaves an earlier file intact)
        target = os.path.abspath(json_path)
        folder = os.path.dirname(target)
        if (os.path.isdir(target) or not os.path.isdir(folder) or not os.access(folder, os.W_OK)
                or (os.path.exists(target) and not os.access(target, os.W_OK))):
            print(f"cannot write --json {json_path}: not a writable file path", file=sys.stderr)
            return 2
    print(f"seqkern bench ({'full' if full else 'quick'}): {len(cases)} cases, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"backends {backends}")
    rows = run(cases, full, with_reference)
    print(table(rows))
    if json_path:
        tmp = f"{target}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(),
                       "rows": rows}, f, indent=1)
        os.replace(tmp, target)
        print(f"wrote {json_path}")
    return 0
