"""pytest-benchmark view of the recurrent suites: `pytest benchmarks/bench_rnn.py`."""
import pytest

from seqkern.bench.rnn import cases

CASES = [c for c in cases(full=False) if c.quick]  # the `seqkern bench --quick` grid


@pytest.mark.parametrize("impl", ["seqkern", "torch"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.shape_str}".replace(" ", "_") for c in CASES])
def test_rnn(benchmark, case, impl):
    fn = case.make()[impl]
    benchmark.group = f"{case.op} {case.shape_str}"
    benchmark.extra_info.update(shape=case.shape, dtype=str(case.dtype))
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
