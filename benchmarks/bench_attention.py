"""pytest-benchmark view of the attention suite: `pytest benchmarks/bench_attention.py`."""
import pytest

from seqkern.bench.attention import cases

CASES = [c for c in cases(full=False) if c.quick]  # the `seqkern bench --quick` grid
IMPLS = ["seqkern", "torch", "reference"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.shape_str}".replace(" ", "_") for c in CASES])
def test_attention(benchmark, case, impl):
    impls = case.make()
    if impl not in impls:
        pytest.skip(f"no {impl} implementation timed for this shape (would take minutes)")
    benchmark.group = f"{case.op} {case.shape_str}"
    benchmark.extra_info.update(shape=case.shape, dtype=str(case.dtype), flops=case.flops)
    benchmark.pedantic(impls[impl], rounds=5, warmup_rounds=1)
