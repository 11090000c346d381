"""Cells against torch's: one inference call at a time (decoding, streaming), median µs per
call over 7 timings of n calls; and a training loop (T calls from a zero state, a loss on every
step's h, backward), median ms per loop over 9 loops; seqkern and torch alternating, 2 threads.

    python benchmarks/scripts/cells_vs_torch.py [infer] [train] [bf16]
"""
import sys
import time

import torch

import seqkern

torch.set_num_threads(2)
KINDS = {"lstm": (seqkern.nn.LSTMCell, torch.nn.LSTMCell), "gru": (seqkern.nn.GRUCell, torch.nn.GRUCell),
         "rnn": (seqkern.nn.RNNCell, torch.nn.RNNCell)}


DTYPE = torch.bfloat16 if "bf16" in sys.argv[1:] else torch.float32


def pair(kind, I, H):
    scls, tcls = KINDS[kind]
    s, t = scls(I, H).to(DTYPE), tcls(I, H).to(DTYPE)
    t.load_state_dict(s.state_dict())
    return s, t


def infer(kind, B, I, H, n=300, reps=7):
    s, t = pair(kind, I, H)
    x = torch.randn(B, I, dtype=DTYPE)
    h = torch.randn(B, H, dtype=DTYPE)
    hx = (h, torch.randn(B, H, dtype=DTYPE)) if kind == "lstm" else h
    res = {"seqkern": [], "torch": []}
    with torch.no_grad():
        for r in range(reps):
            for name, m in (("seqkern", s), ("torch", t)):
                tt = time.perf_counter()
                for _ in range(n):
                    m(x, hx)
                res[name].append((time.perf_counter() - tt) / n * 1e6)
    a, b = sorted(res["seqkern"])[reps // 2], sorted(res["torch"])[reps // 2]
    print(f"| {kind}Cell | {B} | {I} | {H} | {a:.1f} | {b:.1f} | {b/a:.2f}× |", flush=True)


def train(kind, B, I, H, T=20, reps=9):
    from seqkern.bench.rnn import _make_cell_loop  # (the loop `seqkern bench --full` times)

    fns = _make_cell_loop(kind, T, B, I, H, DTYPE, True)()
    res = {"seqkern": [], "torch": []}
    for r in range(reps + 2):
        for name in ("seqkern", "torch"):
            tt = time.perf_counter()
            fns[name]()
            if r >= 2:
                res[name].append((time.perf_counter() - tt) * 1e3)
    a, b = sorted(res["seqkern"])[reps // 2], sorted(res["torch"])[reps // 2]
    print(f"| {kind}Cell | {T} | {B} | {I} | {H} | {a:.2f} | {b:.2f} | {b/a:.2f}× |", flush=True)


if __name__ == "__main__":
    what = [a for a in sys.argv[1:] if a != "bf16"] or ["infer", "train"]
    print(f"dtype {DTYPE}, {torch.get_num_threads()} threads")
    if "infer" in what:
        print("| cell | B | I | H | seqkern µs | torch µs | speedup |\n|---|---|---|---|---|---|---|")
        for kind in KINDS:
            for (B, I, H) in ((1, 256, 256), (4, 256, 256), (16, 256, 256), (1, 1024, 1024),
                              (32, 1024, 1024)):
                infer(kind, B, I, H, n=300 if H == 256 else 40)
    if "train" in what:
        print("\n| cell | T | B | I | H | seqkern ms | torch ms | speedup |\n"
              "|---|---|---|---|---|---|---|---|")
        for kind in KINDS:
            for (B, I, H) in ((1, 256, 256), (4, 256, 256), (16, 256, 256), (64, 512, 512)):
                train(kind, B, I, H)
