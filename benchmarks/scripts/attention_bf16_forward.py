"""bf16 causal attention forward on the issue grid against torch's SDPA, interleaved in one
process (2 threads), with the geometric mean of the speedups.

    python benchmarks/scripts/attention_bf16_forward.py
"""
import math

import torch
import torch.nn.functional as F

import seqkern
from _interleave import interleaved_us

torch.set_num_threads(2)
GRID = [(8, 4, 256, 64), (4, 8, 1024, 64), (1, 16, 4096, 64), (2, 8, 2048, 128), (32, 8, 128, 64)]
ratios = []
print("| B, H, L, D | seqkern µs | torch µs | speedup |\n|---|---|---|---|")
for B, H, L, D in GRID:
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.bfloat16) for _ in range(3))
    with torch.no_grad():
        r = interleaved_us({
            "sk": lambda: seqkern.ops.scaled_dot_product_attention(q, k, v, is_causal=True),
            "torch": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)},
            n=max(1, int(2e8 / (B * H * L * L * D))), rounds=7, warm=1)
    ratios.append(r["torch"] / r["sk"])
    print(f"| {B}, {H}, {L}, {D} | {r['sk']:.0f} | {r['torch']:.0f} | {ratios[-1]:.2f}× |",
          flush=True)
print(f"geo-mean {math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}×")
