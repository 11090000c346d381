"""bfloat16 attention training accuracy against torch's: for random problems (batch, heads,
GQA, query/key lengths, head dims with Dv = D and Dv != D, causal, additive and bool masks,
query scales 1-8) the largest and the mean absolute error of the output and of dq, dk, dv
against a float64 reference, each divided by torch's own error in bf16 on the same problem.
Prints, per gradient and per D = Dv / D != Dv (where torch's CPU SDPA takes its fp32 math path
instead of its bf16 flash kernel), the median, 90th percentile and largest ratio.

    python benchmarks/scripts/attention_bf16_gradient_error.py [cases]   # default 200
    SEQKERN_ATTENTION_AMX=0 python ...                                   # seqkern in fp32
"""
import collections
import random
import statistics
import sys

import torch
import torch.nn.functional as F

from seqkern.ops import scaled_dot_product_attention as sdpa

torch.set_num_threads(1)


def problem(seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    B, Hkv = rng.choice([1, 2]), rng.choice([1, 2])
    Hq = Hkv * rng.choice([1, 2, 4])
    Lq = rng.choice([5, 9, 17, 33, 64, 100, 129, 200])
    Lk = Lq if rng.random() < 0.6 else rng.choice([40, 129, 300])
    D = rng.choice([16, 40, 64, 128])
    Dv = D if rng.random() < 0.7 else rng.choice([16, 64])
    causal = rng.random() < 0.5 and Lq <= Lk
    scale = rng.choice([1.0, 2.0, 4.0, 8.0])
    kind = rng.choice(["none", "additive", "bool"])
    q = (torch.randn(B, Hq, Lq, D, generator=g) * scale).bfloat16()
    k = torch.randn(B, Hkv, Lk, D, generator=g).bfloat16()
    v = torch.randn(B, Hkv, Lk, Dv, generator=g).bfloat16()
    go = torch.randn(B, Hq, Lq, Dv, generator=g).bfloat16()
    mask = None
    if kind == "additive":
        mask = (torch.randn(B, 1, Lq, Lk, generator=g) * 2).bfloat16()
    elif kind == "bool":
        mask = torch.rand(B, 1, Lq, Lk, generator=g) > 0.3
        mask[..., 0] = True
    return (q, k, v, go, mask, causal), D == Dv


def run(fn, dtype, q, k, v, go, mask, causal, ours):
    """[out, dq, dk, dv] in float64; causal is bottom-right (torch given the bool mask)."""
    qq, kk, vv = (t.to(dtype).detach().requires_grad_() for t in (q, k, v))
    m = mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)
    Lq, Lk = q.shape[-2], k.shape[-2]
    kw = {}
    if causal and ours:
        kw = dict(is_causal=True, causal_alignment="bottom_right")
    elif causal:
        c = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
        m = c if m is None else (m & c if m.dtype == torch.bool else m.masked_fill(~c, float("-inf")))
    out = fn(qq, kk, vv, attn_mask=m, enable_gqa=True, **kw)
    grads = torch.autograd.grad(out, (qq, kk, vv), go.to(dtype))
    return [t.detach().double() for t in (out, *grads)]


def main():
    cases = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    ratios = collections.defaultdict(list)
    for seed in range(cases):
        args, same_dims = problem(seed)
        ref = run(F.scaled_dot_product_attention, torch.float64, *args, ours=False)
        theirs = run(F.scaled_dot_product_attention, torch.bfloat16, *args, ours=False)
        mine = run(sdpa, torch.bfloat16, *args, ours=True)
        for name, a, b, r in zip(["out", "dq", "dk", "dv"], mine, theirs, ref):
            key = ("D = Dv" if same_dims else "D != Dv", name)
            err_max = lambda x: (x - r).abs().max().item()
            err_mean = lambda x: (x - r).abs().mean().item()
            ratios[key].append((err_max(a) / max(err_max(b), 1e-30),
                                err_mean(a) / max(err_mean(b), 1e-30)))
    print("| dims | tensor | cases | max-error ratio: median | p90 | largest | mean-error ratio: median | largest |")
    print("|---|---|---|---|---|---|---|---|")
    for (dims, name), rs in sorted(ratios.items()):
        mx = sorted(r for r, _ in rs)
        mean = [m for _, m in rs]
        print(f"| {dims} | {name} | {len(rs)} | {statistics.median(mx):.2f} | "
              f"{mx[int(0.9 * len(mx))]:.2f} | {mx[-1]:.2f} | {statistics.median(mean):.2f} | "
              f"{max(mean):.2f} |")


if __name__ == "__main__":
    main()
