import torch


def pytest_configure(config):
    # The suites state their thread count; pin it so runs are comparable.
    torch.set_num_threads(int(__import__("os").environ.get("SEQKERN_BENCH_THREADS", "2")))
