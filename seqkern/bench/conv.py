"""Convolution suite ("conv"): dilated causal conv, depthwise causal conv, the WaveNet block and
WaveNet generation, against the same computation written with torch modules (nn.Conv1d on the
explicitly left-padded input), float32. Shapes are the convolution issue's."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from seqkern.bench.case import Case

DENSE = [(8, 64, 16000, 2, 8), (16, 256, 4096, 3, 4), (4, 128, 8192, 2, 512)]  # B, C, L, K, d
DEPTHWISE = [(8, 1024, 2048, 4), (4, 2048, 4096, 3), (16, 512, 1024, 2)]      # B, C, L, K
WAVENET = dict(B=4, R=64, G=128, S=256, K=2, L=16000)
WAVENET_DILATIONS_FULL = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
WAVENET_DILATIONS_QUICK = [1, 64, 512]
GENERATE = dict(layers=30, R=64, G=128, S=256, K=2, cycle=10)


def _padded(conv: torch.nn.Conv1d, x):
    return conv(F.pad(x, ((conv.kernel_size[0] - 1) * conv.dilation[0], 0)))


def _train_step(f, params):
    def g():
        out = f()
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum(o.sum() for o in outs)
        loss.backward()
        for p in params:
            p.grad = None
    return g


def _no_grad(f):
    def g():
        with torch.no_grad():
            return f()
    return g


def _conv_make(B, C, L, K, d, groups, train, dtype):
    def make():
        import seqkern.nn as snn
        from seqkern.reference import conv as ref

        torch.manual_seed(0)
        t = torch.nn.Conv1d(C, C, K, dilation=d, groups=groups, dtype=dtype)
        s = snn.CausalConv1d(C, C, K, dilation=d, groups=groups, dtype=dtype)
        s.load_state_dict(t.state_dict())
        x = torch.randn(B, C, L, dtype=dtype, requires_grad=train)
        impls = {"seqkern": lambda: s(x), "torch": lambda: _padded(t, x)}
        if not train:
            impls["reference"] = ((lambda: ref.depthwise_causal_conv1d(x, s.weight, s.bias, d))
                                  if groups == C else
                                  (lambda: ref.causal_conv1d(x, s.weight, s.bias, d, groups)))
        wrap = (lambda f, p: _train_step(f, p)) if train else (lambda f, p: _no_grad(f))
        return {"seqkern": wrap(impls["seqkern"], [x, *s.parameters()]),
                "torch": wrap(impls["torch"], [x, *t.parameters()]),
                **({"reference": wrap(impls["reference"], [])} if "reference" in impls else {})}
    return make


def _torch_wavenet_block(conv, skip, res, G):
    def block(x):
        h = _padded(conv, x)
        z = torch.tanh(h[:, :G]) * torch.sigmoid(h[:, G:])
        return x + res(z), skip(z)
    return block


def _wavenet_make(d, dtype):
    def make():
        import seqkern.nn as snn

        w = WAVENET
        torch.manual_seed(0)
        s = snn.WaveNetBlock(w["R"], w["G"], w["S"], w["K"], d, dtype=dtype)
        conv = torch.nn.Conv1d(w["R"], 2 * w["G"], w["K"], dilation=d, dtype=dtype)
        conv.load_state_dict(s.conv.state_dict())
        tblock = _torch_wavenet_block(conv, s.skip, s.res, w["G"])
        x = torch.randn(w["B"], w["R"], w["L"], dtype=dtype, requires_grad=True)
        return {"seqkern": _train_step(lambda: s(x), [x, *s.parameters()]),
                "torch": _train_step(lambda: tblock(x), [x, *s.parameters(), *conv.parameters()])}
    return make


def _generate_make(dtype):
    def make():
        import seqkern.nn as snn

        g = GENERATE
        torch.manual_seed(0)
        net = snn.WaveNet(g["layers"], g["R"], g["G"], g["S"], g["K"], g["cycle"], dtype=dtype)
        convs = []
        for b in net.blocks:
            c = torch.nn.Conv1d(g["R"], 2 * g["G"], g["K"], dilation=b.dilation, dtype=dtype)
            c.load_state_dict(b.conv.state_dict())
            convs.append(_torch_wavenet_block(c, b.skip, b.res, g["G"]))
        rf = net.receptive_field
        window = torch.randn(1, g["R"], rf, dtype=dtype)
        state = [net.initial_state(1)]
        x_t = torch.randn(1, g["R"], dtype=dtype)

        def step():
            with torch.no_grad():
                y, state[0] = net.step(x_t, state[0])
            return y

        def rerun():
            # what generating without queues costs: the whole stack over the receptive field,
            # keeping only the last column
            with torch.no_grad():
                x, total = window, 0
                for blk in convs:
                    x, skip = blk(x)
                    total = total + skip[:, :, -1]
            return total

        return {"seqkern": step, "torch": rerun}
    return make


def _conv_flops(B, C_in, C_out, L, K, groups):
    return 2.0 * B * C_out * (C_in // groups) * K * L


def cases(full: bool) -> list[Case]:
    dt = torch.float32
    out = []
    for B, C, L, K, d in DENSE:
        f = _conv_flops(B, C, C, L, K, 1)
        for train in (False, True):
            out.append(Case("conv", "conv fwd+bwd" if train else "conv fwd",
                            {"B": B, "C": C, "L": L, "K": K, "d": d}, dt,
                            _conv_make(B, C, L, K, d, 1, train, dt), flops=3 * f if train else f))
    for B, C, L, K in DEPTHWISE:
        elems = B * C * L * 4.0
        for train in (False, True):
            # fwd reads x, writes y; bwd reads grad_y and x, writes dx
            out.append(Case("conv", "depthwise fwd+bwd" if train else "depthwise fwd",
                            {"B": B, "C": C, "L": L, "K": K}, dt,
                            _conv_make(B, C, L, K, 1, C, train, dt),
                            flops=_conv_flops(B, C, C, L, K, C) * (3 if train else 1),
                            bytes=elems * (5 if train else 2)))
    w = WAVENET
    for d in WAVENET_DILATIONS_FULL if full else WAVENET_DILATIONS_QUICK:
        per_col = 2 * w["G"] * w["R"] * w["K"] + w["S"] * w["G"] + w["R"] * w["G"]
        out.append(Case("conv", "wavenet block fwd+bwd",
                        {"B": w["B"], "R": w["R"], "G": w["G"], "S": w["S"], "K": w["K"], "d": d,
                         "L": w["L"]}, dt, _wavenet_make(d, dt),
                        flops=3 * 2.0 * w["B"] * w["L"] * per_col))
    g = GENERATE
    out.append(Case("conv", "wavenet generate",
                    {"layers": g["layers"], "R": g["R"], "G": g["G"], "S": g["S"], "K": g["K"]},
                    dt, _generate_make(dt),
                    flops=g["layers"] * 2.0 * (2 * g["G"] * g["R"] * g["K"] + g["S"] * g["G"]
                                               + g["R"] * g["G"]),
                    extra={"note": "torch = re-running the stack on the receptive field"}))
    return out
