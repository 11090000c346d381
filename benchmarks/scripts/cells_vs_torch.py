"""Inference cells against torch's, one call at a time (decoding, streaming): median µs per call
over 7 timings of n calls, seqkern and torch alternating, 2 threads.

    python benchmarks/scripts/cells_vs_torch.py
"""
import time, torch, seqkern
torch.set_num_threads(2)
def bench(kind, B, I, H, n=300, reps=7):
    scls = {"lstm": seqkern.nn.LSTMCell, "gru": seqkern.nn.GRUCell, "rnn": seqkern.nn.RNNCell}[kind]
    tcls = {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell, "rnn": torch.nn.RNNCell}[kind]
    s, t = scls(I, H), tcls(I, H); t.load_state_dict(s.state_dict())
    x = torch.randn(B, I); h = torch.randn(B, H)
    hx = (h, torch.randn(B, H)) if kind == "lstm" else h
    res = {"seqkern": [], "torch": []}
    with torch.no_grad():
        for r in range(reps):
            for name, m in (("seqkern", s), ("torch", t)):
                tt = time.perf_counter()
                for _ in range(n): m(x, hx)
                res[name].append((time.perf_counter() - tt) / n * 1e6)
    a, b = sorted(res["seqkern"])[reps // 2], sorted(res["torch"])[reps // 2]
    print(f"| {kind}Cell | {B} | {I} | {H} | {a:.1f} | {b:.1f} | {b/a:.2f}× |", flush=True)
print("| cell | B | I | H | seqkern µs | torch µs | speedup |\n|---|---|---|---|---|---|---|")
for kind in ("lstm", "gru", "rnn"):
    for (B, I, H) in ((1, 256, 256), (4, 256, 256), (1, 1024, 1024), (32, 1024, 1024)):
        bench(kind, B, I, H, n=300 if H == 256 else 40)
