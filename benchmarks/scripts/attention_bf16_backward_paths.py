"""bfloat16 causal attention forward+backward on the issue grid: seqkern on oneDNN brgemm tiles
(SEQKERN_ATTENTION_AMX=1), seqkern computing in fp32 (=0) and torch, alternating in one
process; median of 5. Optional argument: comma-separated grid indices, e.g. `2,3`.

    python benchmarks/scripts/attention_bf16_backward_paths.py [indices]
"""
import os, sys, time, torch, seqkern
import torch.nn.functional as F
from seqkern.ops import scaled_dot_product_attention as sdpa
torch.set_num_threads(2)
shapes = [(8,4,256,64),(4,8,1024,64),(1,16,4096,64),(2,8,2048,128),(32,8,128,64)]
if len(sys.argv) > 1: shapes = [shapes[int(i)] for i in sys.argv[1].split(",")]
reps = 5
for (B,H,L,D) in shapes:
    q,k,v = (torch.randn(B,H,L,D,dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    go = torch.randn(B,H,L,D,dtype=torch.bfloat16)
    def ours(): 
        out = sdpa(q,k,v,is_causal=True); out.backward(go)
    def theirs():
        out = F.scaled_dot_product_attention(q,k,v,is_causal=True); out.backward(go)
    variants = {"amx": ("1", ours), "fp32": ("0", ours), "torch": ("1", theirs)}
    times = {n: [] for n in variants}
    for r in range(reps):
        for n,(env,fn) in variants.items():
            os.environ["SEQKERN_ATTENTION_AMX"] = env
            t=time.perf_counter(); fn(); times[n].append(time.perf_counter()-t)
    flops = 4*B*H*L*L*D/2 * 3.5
    print((B,H,L,D), "  ".join(f"{n} {sorted(t)[len(t)//2]*1e3:.1f}ms ({flops/sorted(t)[len(t)//2]/1e9:.0f} GF/s)" for n,t in times.items()), flush=True)
