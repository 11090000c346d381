"""The Triton kernels on a real CUDA device: the interpreter suite's assertions at larger
shapes, bf16, the custom-op CUDA registrations (opcheck), and a speed report against
cuDNN / torch SDPA (printed with `pytest -s`, never asserted). Skips cleanly without a GPU."""
import math

import pytest
import torch

triton = pytest.importorskip("triton")

import seqkern  # noqa: E402
from seqkern.ops import attention as attn_ops  # noqa: E402
from seqkern.ops import conv as conv_ops  # noqa: E402
from seqkern.ops import rnn as rnn_ops  # noqa: E402
from seqkern.reference import attention as ref_attn  # noqa: E402
from seqkern.reference import conv as ref_conv  # noqa: E402
from seqkern.reference import rnn as ref_rnn  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.triton,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEV = "cuda"
TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _grads(out, leaves):
    g = [torch.randn_like(o) for o in out]
    return torch.autograd.grad(out, leaves, g, allow_unused=True)


def _bench(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50)


# ---------------------------------------------------------------- recurrences ---------------

@pytest.mark.parametrize("mode", ref_rnn.MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rnn_layer_matches_reference(mode, dtype):
    torch.manual_seed(0)
    G, B, I, H, T = ref_rnn.gate_count(mode), 37, 96, 160, 40
    lengths = torch.randint(1, T + 1, (B,)).sort(descending=True).values
    lengths[0] = T
    x = torch.randn(T, B, I, device=DEV)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=True)
    w = {"w_ih": torch.randn(G * H, I, device=DEV) * 0.1,
         "w_hh": torch.randn(G * H, H, device=DEV) * 0.1,
         "b_ih": torch.randn(G * H, device=DEV) * 0.1, "b_hh": torch.randn(G * H, device=DEV) * 0.1}
    h0 = torch.randn(B, H, device=DEV)
    c0 = torch.randn(B, H, device=DEV) if mode == "lstm" else None
    leaves = [t.to(dtype).requires_grad_() for t in [packed.data, h0] + list(w.values())]
    cl = c0.to(dtype).requires_grad_() if c0 is not None else None
    wd = dict(zip(w, leaves[2:]))
    with seqkern.use_backend("triton"):
        out, hn, cn = rnn_ops.recurrent_layer(mode, leaves[0], packed.batch_sizes, leaves[1], cl, wd)
    want = rnn_ops._reference_layer(mode, *[t.float() for t in leaves[:1]], packed.batch_sizes,
                                    leaves[1].float(), cl.float() if cl is not None else None,
                                    {k: v.float() for k, v in wd.items()}, False)
    torch.testing.assert_close(out.float(), want[0], **TOL[dtype])
    torch.testing.assert_close(hn.float(), want[1], **TOL[dtype])
    if dtype == torch.float32:
        ins = leaves + ([cl] if cl is not None else [])
        outs = [out, hn] + ([cn] if cn is not None else [])
        wants = [want[0], want[1]] + ([want[2]] if cn is not None else [])
        torch.manual_seed(1)
        g1 = _grads(outs, ins)
        torch.manual_seed(1)
        g2 = _grads(wants, ins)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, **TOL[dtype])


def test_rnn_speed_report():
    B, I, H, T = 64, 256, 256, 200
    lstm = torch.nn.LSTM(I, H).to(DEV)
    x = torch.randn(T, B, I, device=DEV)
    w = {"w_ih": lstm.weight_ih_l0, "w_hh": lstm.weight_hh_l0, "b_ih": lstm.bias_ih_l0,
         "b_hh": lstm.bias_hh_l0}
    h0 = torch.zeros(B, H, device=DEV)
    bs = torch.full((T,), B, dtype=torch.int64)
    with torch.no_grad(), seqkern.use_backend("triton"):
        ours = _bench(lambda: rnn_ops.recurrent_layer("lstm", x.reshape(T * B, I), bs, h0, h0, w))
        got = rnn_ops.recurrent_layer("lstm", x.reshape(T * B, I), bs, h0, h0, w)[0]
    with torch.no_grad():
        cudnn = _bench(lambda: lstm(x))
        torch.testing.assert_close(got.view(T, B, H), lstm(x)[0], atol=2e-4, rtol=2e-4)
    print(f"\nLSTM T={T} B={B} H={H} fwd: triton {ours:.3f} ms, cuDNN {cudnn:.3f} ms")


# ---------------------------------------------------------------- attention -----------------

@pytest.mark.parametrize("kw", [dict(), dict(is_causal=True),
                                dict(is_causal=True, window=100, causal_alignment="bottom_right"),
                                dict(key_lengths="random")], ids=["plain", "causal", "window", "kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_matches_reference(kw, dtype):
    torch.manual_seed(0)
    B, Hq, Hkv, L, D = 2, 8, 2, 1000, 64
    q, k, v = (torch.randn(B, h, L, D, device=DEV, dtype=dtype, requires_grad=True)
               for h in (Hq, Hkv, Hkv))
    kw = dict(kw)
    if kw.get("key_lengths") == "random":
        kw["key_lengths"] = torch.tensor([L, 517], device=DEV)
    with seqkern.use_backend("triton"):
        out = seqkern.ops.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
    want = ref_attn.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                 enable_gqa=True, **kw)
    torch.testing.assert_close(out.float(), want, **TOL[dtype])
    torch.manual_seed(1)
    g1 = _grads([out], [q, k, v])
    torch.manual_seed(1)
    g2 = _grads([want], [q, k, v])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])


def test_attention_dropout_and_mask_gradient():
    """Dropout (the cpu kernels' keep pattern for the seed) and an additive mask's gradient,
    summed over the heads it broadcasts along."""
    torch.manual_seed(0)
    B, Hq, Hkv, L, D = 2, 4, 2, 300, 64
    q, k, v = (torch.randn(B, h, L, D, device=DEV, requires_grad=True) for h in (Hq, Hkv, Hkv))
    m = torch.randn(B, 1, L, L, device=DEV, requires_grad=True)
    kw = dict(attn_mask=m, is_causal=True, enable_gqa=True, dropout_p=0.2)
    torch.manual_seed(3)
    with seqkern.use_backend("triton"):
        out = seqkern.ops.scaled_dot_product_attention(q, k, v, **kw)
    torch.manual_seed(3)
    keep = seqkern.ops.dropout_keep_mask((B, Hq, L, L), 0.2, attn_ops._draw_seed()).to(DEV)
    want = ref_attn.scaled_dot_product_attention(q, k, v, dropout_mask=keep, **kw)
    torch.testing.assert_close(out, want, **TOL[torch.float32])
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v, m), g),
                    torch.autograd.grad(want, (q, k, v, m), g)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_attention_custom_ops_opcheck():
    q, k, v = (torch.randn(1, 2, 130, 64, device=DEV) for _ in range(3))
    torch.library.opcheck(attn_ops._attention_forward_op,
                          (q, k, v, None, None, True, False, 0, 0.125, 0.0, None))


def test_attention_speed_report():
    B, H, L, D = 4, 16, 4096, 128
    q, k, v = (torch.randn(B, H, L, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    with seqkern.use_backend("triton"):
        ours = _bench(lambda: seqkern.ops.scaled_dot_product_attention(q, k, v, is_causal=True))
    sdpa = _bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v,
                                                                           is_causal=True))
    flops = 4 * B * H * L * L * D / 2
    print(f"\ncausal attention B={B} H={H} L={L} D={D} bf16 fwd: triton {ours:.3f} ms "
          f"({flops / ours / 1e9:.0f} TFLOP/s), SDPA {sdpa:.3f} ms")
    kc, vc = (torch.randn(B, 2, 32768, D, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    qd = torch.randn(B, 16, 1, D, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad(), seqkern.use_backend("triton"):
        dec = _bench(lambda: seqkern.ops.scaled_dot_product_attention(qd, kc, vc, enable_gqa=True))
        got = seqkern.ops.scaled_dot_product_attention(qd, kc, vc, enable_gqa=True)
    want = ref_attn.scaled_dot_product_attention(qd.float(), kc.float(), vc.float(),
                                                 enable_gqa=True)
    torch.testing.assert_close(got.float(), want, **TOL[torch.bfloat16])
    gb = 2 * kc.numel() * 2 / 1e9
    print(f"decode 1 token vs 32k cache (GQA 16/2): {dec:.3f} ms, {gb / dec * 1e3:.0f} GB/s")


# ---------------------------------------------------------------- convolution ---------------

@pytest.mark.parametrize("groups", [1, 4, 64], ids=["dense", "grouped", "depthwise"])
def test_conv_matches_reference(groups):
    torch.manual_seed(0)
    B, C, L, K, d = 4, 64, 3000, 3, 16
    x = torch.randn(B, C, L, device=DEV, requires_grad=True)
    w = (torch.randn(C, C // groups, K, device=DEV) * 0.1).requires_grad_()
    b = torch.randn(C, device=DEV, requires_grad=True)
    st = torch.randn(B, C, (K - 1) * d, device=DEV, requires_grad=True)
    with seqkern.use_backend("triton"):
        y = conv_ops.causal_conv1d(x, w, b, d, groups, "silu", st)
    want = ref_conv.causal_conv1d(x, w, b, d, groups, "silu", st)
    torch.testing.assert_close(y, want, **TOL[torch.float32])
    torch.manual_seed(1)
    g1 = _grads([y], [x, w, b, st])
    torch.manual_seed(1)
    g2 = _grads([want], [x, w, b, st])
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c, atol=1e-3, rtol=1e-3)


def test_wavenet_block_matches_reference():
    torch.manual_seed(0)
    B, R, G, S, L, K, d = 4, 64, 64, 128, 2000, 2, 64
    ins = [torch.randn(B, R, L, device=DEV), torch.randn(2 * G, R, K, device=DEV) * 0.1,
           torch.randn(2 * G, device=DEV), torch.randn(S, G, 1, device=DEV) * 0.1,
           torch.randn(S, device=DEV), torch.randn(R, G, 1, device=DEV) * 0.1,
           torch.randn(R, device=DEV)]
    ins = [t.requires_grad_() for t in ins]
    with seqkern.use_backend("triton"):
        got = conv_ops.wavenet_block(*ins, dilation=d)
    want = ref_conv.wavenet_block(*ins, dilation=d)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, **TOL[torch.float32])
    torch.manual_seed(1)
    g1 = _grads(list(got), ins)
    torch.manual_seed(1)
    g2 = _grads(list(want), ins)
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c, atol=1e-3, rtol=1e-3)


def test_conv_speed_report():
    B, C, L, K, d = 8, 256, 16384, 2, 8
    x = torch.randn(B, C, L, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(C, C, K, device=DEV, dtype=torch.bfloat16) * 0.05
    with torch.no_grad(), seqkern.use_backend("triton"):
        ours = _bench(lambda: conv_ops.causal_conv1d(x, w, None, d))
    conv = torch.nn.Conv1d(C, C, K, dilation=d, padding=(K - 1) * d, bias=False).to(DEV,
                                                                                     torch.bfloat16)
    with torch.no_grad():
        conv.weight.copy_(w)
        theirs = _bench(lambda: conv(x)[..., :L])
    print(f"\ncausal conv1d B={B} C={C} L={L} K={K} bf16: triton {ours:.3f} ms, "
          f"cuDNN (padded) {theirs:.3f} ms")
