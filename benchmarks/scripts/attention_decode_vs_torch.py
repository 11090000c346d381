"""One decoding step (1 query against a KV cache, B = 1, H = 16, D = 64, 2 threads) against
torch's SDPA, interleaved in one process; GB/s = K and V bytes read per call.

    python benchmarks/scripts/attention_decode_vs_torch.py
"""
import torch
import torch.nn.functional as F

import seqkern
from _interleave import interleaved_us

torch.set_num_threads(2)
B, H, D = 1, 16, 64
print("| cache | dtype | seqkern µs (GB/s) | torch µs (GB/s) | speedup |\n|---|---|---|---|---|")
for L in (256, 4096):
    for dt in (torch.float32, torch.bfloat16):
        q = torch.randn(B, H, 1, D, dtype=dt)
        k, v = (torch.randn(B, H, L + 1, D, dtype=dt) for _ in range(2))
        with torch.no_grad():
            r = interleaved_us({
                "sk": lambda: seqkern.ops.scaled_dot_product_attention(
                    q, k, v, is_causal=True, causal_alignment="bottom_right"),
                "torch": lambda: F.scaled_dot_product_attention(q, k, v)})
        gb = 2 * k.numel() * k.element_size() / 1e3
        print(f"| {L} | {dt} | {r['sk']:.0f} ({gb / r['sk']:.1f}) | {r['torch']:.0f} "
              f"({gb / r['torch']:.1f}) | {r['torch'] / r['sk']:.2f}× |")
