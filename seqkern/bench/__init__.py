"""Benchmark suites behind `seqkern bench` and `pytest benchmarks/`.

Each op family has a module here (rnn.py, attention.py, conv.py) whose ``cases(full)`` returns
``Case`` objects; ``seqkern.bench.harness`` times them and prints the table.
"""
