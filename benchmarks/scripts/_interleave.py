"""Median µs per call of several callables, timed in interleaved batches (a, b, c, a, b, c, ...)
so that this VM's drift falls on all alike."""
import statistics
import time


def interleaved_us(fns, n=20, rounds=21, warm=5):
    for f in fns.values():
        for _ in range(warm):
            f()
    ts = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            ts[k].append((time.perf_counter() - t0) / n * 1e6)
    return {k: statistics.median(v) for k, v in ts.items()}
