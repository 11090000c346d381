"""Recurrent modules over few rows (B = 1 and 4; T = 1, 5, 12, 50; I = H = 128 and 512; one
layer, no gradients) against torch's: streaming calls and short sequences, where the per-step
products are GEMVs and the weights' streaming, not the FLOPs, sets the time. Median µs per call,
seqkern and torch interleaved, 2 threads.

    python benchmarks/scripts/recurrent_few_rows.py [fp32] [bf16]
"""
import sys

import torch

import seqkern
from _interleave import interleaved_us

torch.set_num_threads(2)
dtypes = [d for name, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))
          if name in sys.argv[1:]] or [torch.float32, torch.bfloat16]
print("| dtype | module | H | B | T | seqkern µs | torch µs | speedup |\n|---|---|---|---|---|---|---|---|")
for dtype in dtypes:
    for kind in ("LSTM", "GRU", "RNN"):
        for H in (128, 512):
            for B in (1, 4):
                for T in (1, 5, 12, 50):
                    s = getattr(seqkern.nn, kind)(H, H).to(dtype)
                    t = getattr(torch.nn, kind)(H, H).to(dtype)
                    s.load_state_dict(t.state_dict())
                    x = torch.randn(T, B, H, dtype=dtype)
                    with torch.no_grad():
                        us = interleaved_us({"sk": lambda: s(x), "torch": lambda: t(x)},
                                            n=max(2, 40 // T), rounds=11)
                    print(f"| {str(dtype)[6:]} | {kind} | {H} | {B} | {T} | {us['sk']:.0f} | "
                          f"{us['torch']:.0f} | {us['torch'] / us['sk']:.2f}× |", flush=True)
