"""A few queries against a long cache (speculative decoding's verify step, small prefill
chunks) against torch's SDPA: B = 2, H = 16, 4096 cached keys, D = 64, 2 threads, bottom-right
causal (torch given the equivalent bool mask), and the same with a left-padding bool mask
(both libraries given it); forward and forward+backward, interleaved in one process.

    python benchmarks/scripts/attention_few_queries_vs_torch.py
"""
import torch
import torch.nn.functional as F

import seqkern
from _interleave import interleaved_us

torch.set_num_threads(2)
B, H, L, D = 2, 16, 4096, 64
print("| dtype | mask | queries | seqkern fwd ms | torch fwd ms | speedup | seqkern fwd+bwd ms "
      "| torch fwd+bwd ms | speedup |\n|---|---|---|---|---|---|---|---|---|")
for dt in (torch.float32, torch.bfloat16):
    for padded in (False, True):
        for Lq in (1, 2, 4, 8, 16, 32):
            q = torch.randn(B, H, Lq, D, dtype=dt, requires_grad=True)
            k, v = (torch.randn(B, H, L + Lq, D, dtype=dt, requires_grad=True) for _ in range(2))
            go = torch.randn(B, H, Lq, D, dtype=dt)
            i, j = torch.arange(Lq)[:, None], torch.arange(L + Lq)[None, :]
            allowed = j <= i + L
            if padded:  # the first 100 positions of the cache are padding
                allowed = allowed & (j >= 100)
            allowed = allowed.expand(B, 1, Lq, L + Lq)
            ours = dict(attn_mask=allowed) if padded else dict(is_causal=True, causal_alignment="bottom_right")

            def sk():
                return seqkern.ops.scaled_dot_product_attention(q, k, v, **ours)

            def th():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)

            with torch.no_grad():
                f = interleaved_us({"sk": sk, "torch": th}, n=5, rounds=15)
            b = interleaved_us({"sk": lambda: sk().backward(go), "torch": lambda: th().backward(go)},
                               n=1, rounds=7, warm=2)
            print(f"| {str(dt)[6:]} | {'padding' if padded else 'causal'} | {Lq} | {f['sk'] / 1e3:.2f} "
                  f"| {f['torch'] / 1e3:.2f} | {f['torch'] / f['sk']:.2f}× | {b['sk'] / 1e3:.1f} "
                  f"| {b['torch'] / 1e3:.1f} | {b['torch'] / b['sk']:.2f}× |", flush=True)
