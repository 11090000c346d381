"""Recurrent modules at B = 1 (T = 50, I = H = 128, float32, 2 threads) against torch's, in one
process, interleaved: inference (no_grad) and training (forward + backward of out.sum()).

    python benchmarks/scripts/recurrent_small_batch.py
"""
import torch

import seqkern
from _interleave import interleaved_us

torch.set_num_threads(2)
print("| module | inference seqkern / torch µs | training seqkern / torch µs |\n|---|---|---|")
for kind in ("RNN", "GRU", "LSTM"):
    s, t = getattr(seqkern.nn, kind)(128, 128), getattr(torch.nn, kind)(128, 128)
    s.load_state_dict(t.state_dict())
    x = torch.randn(50, 1, 128)
    with torch.no_grad():
        inf = interleaved_us({"sk": lambda: s(x), "torch": lambda: t(x)}, n=10)
    xg = x.clone().requires_grad_()

    def train(m):
        return lambda: m(xg)[0].sum().backward()
    tr = interleaved_us({"sk": train(s), "torch": train(t)}, n=5)
    print(f"| {kind} | {inf['sk']:.0f} / {inf['torch']:.0f} ({inf['torch'] / inf['sk']:.1f}×) | "
          f"{tr['sk']:.0f} / {tr['torch']:.0f} ({tr['torch'] / tr['sk']:.2f}×) |")
