"""The reference recurrences agree with torch.nn in float64, and the variants torch lacks are
checked by independent means (hand-computed steps, chunked equals whole)."""
import math

import pytest
import torch

from seqkern.reference import rnn as ref

D64 = torch.float64


def _weights(m, L, D):
    out = []
    for k in range(L):
        for d in range(D):
            s = f"_l{k}" + ("_reverse" if d else "")
            w = {"w_ih": getattr(m, "weight_ih" + s), "w_hh": getattr(m, "weight_hh" + s)}
            if m.bias:
                w["b_ih"], w["b_hh"] = getattr(m, "bias_ih" + s), getattr(m, "bias_hh" + s)
            if getattr(m, "proj_size", 0):
                w["w_hr"] = getattr(m, "weight_hr" + s)
            out.append(w)
    return out


@pytest.mark.parametrize("kind", ["rnn_tanh", "rnn_relu", "lstm", "gru", "lstm_proj"])
@pytest.mark.parametrize("layers,bidir", [(1, False), (2, True)])
@pytest.mark.parametrize("bias", [True, False])
def test_reference_matches_torch(kind, layers, bidir, bias):
    T, B, I, H = 7, 3, 5, 6
    if kind.startswith("rnn"):
        m = torch.nn.RNN(I, H, layers, nonlinearity=kind[4:], bias=bias, bidirectional=bidir)
    elif kind == "gru":
        m = torch.nn.GRU(I, H, layers, bias=bias, bidirectional=bidir)
    else:
        m = torch.nn.LSTM(I, H, layers, bias=bias, bidirectional=bidir,
                          proj_size=3 if kind == "lstm_proj" else 0)
    m = m.double()
    mode = "lstm" if kind.startswith("lstm") else kind
    x = torch.randn(T, B, I, dtype=D64)
    Dn = 2 if bidir else 1
    Hs = 3 if kind == "lstm_proj" else H
    h0 = torch.randn(layers * Dn, B, Hs, dtype=D64)
    c0 = torch.randn(layers * Dn, B, H, dtype=D64) if mode == "lstm" else None
    lengths = torch.tensor([7, 4, 1])
    with torch.no_grad():
        for lens in (None, lengths):
            inp = x if lens is None else torch.nn.utils.rnn.pack_padded_sequence(x, lens)
            y, hn = m(inp, (h0, c0) if c0 is not None else h0)
            if lens is not None:
                y, _ = torch.nn.utils.rnn.pad_packed_sequence(y, total_length=T)
            r, rh, rc = ref.recurrence(mode, x, h0, c0, _weights(m, layers, Dn), layers, bidir,
                                       lengths=lens)
            th, tc = hn if c0 is not None else (hn, None)
            assert (y - r).abs().max() < 1e-10
            assert (th - rh).abs().max() < 1e-10
            if c0 is not None:
                assert (tc - rc).abs().max() < 1e-10


def _sig(v):
    return 1 / (1 + math.exp(-v))


def test_peephole_lstm_hand_computed():
    # H = 1, I = 1: every gate is a scalar, computed here from the SPEC equations by hand.
    w_ih = torch.tensor([[0.5], [-0.3], [0.8], [0.2]], dtype=D64)
    w_hh = torch.tensor([[0.1], [0.4], [-0.6], [0.7]], dtype=D64)
    b = torch.tensor([0.05, -0.1, 0.2, 0.0], dtype=D64)
    p = torch.tensor([[0.3], [-0.2], [0.9]], dtype=D64)
    x, h, c = 1.5, -0.4, 0.25
    i = _sig(0.5 * x + 0.1 * h + 0.05 + 0.3 * c)
    f = _sig(-0.3 * x + 0.4 * h - 0.1 - 0.2 * c)
    g = math.tanh(0.8 * x - 0.6 * h + 0.2)
    c_new = f * c + i * g
    o = _sig(0.2 * x + 0.7 * h + 0.9 * c_new)
    h_new = o * math.tanh(c_new)
    hh, cc = ref.lstm_cell(torch.tensor([[x]], dtype=D64), torch.tensor([[h]], dtype=D64),
                           torch.tensor([[c]], dtype=D64), w_ih, w_hh, b, None, p)
    assert abs(hh.item() - h_new) < 1e-14 and abs(cc.item() - c_new) < 1e-14


def test_cho_gru_hand_computed():
    # H = 2 so that r ⊙ h before W_hn differs from r ⊙ (W_hn h) after it.
    x = torch.tensor([[0.7]], dtype=D64)
    h = torch.tensor([[0.3, -0.5]], dtype=D64)
    w_ih = torch.arange(6, dtype=D64).reshape(6, 1) * 0.1 - 0.2
    w_hh = (torch.arange(12, dtype=D64).reshape(6, 2) * 0.07 - 0.3)
    b_ih = torch.linspace(-0.1, 0.1, 6, dtype=D64)
    b_hh = torch.linspace(0.2, -0.2, 6, dtype=D64)
    r = torch.sigmoid(x @ w_ih[0:2].T + b_ih[0:2] + h @ w_hh[0:2].T + b_hh[0:2])
    z = torch.sigmoid(x @ w_ih[2:4].T + b_ih[2:4] + h @ w_hh[2:4].T + b_hh[2:4])
    rh = [r[0, 0].item() * 0.3, r[0, 1].item() * -0.5]
    n = [math.tanh(0.7 * w_ih[4 + j, 0].item() + b_ih[4 + j].item()
                   + w_hh[4 + j, 0].item() * rh[0] + w_hh[4 + j, 1].item() * rh[1]
                   + b_hh[4 + j].item()) for j in range(2)]
    expect = [(1 - z[0, j].item()) * n[j] + z[0, j].item() * h[0, j].item() for j in range(2)]
    got = ref.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh, reset_after=False)
    assert torch.allclose(got, torch.tensor([expect], dtype=D64), atol=1e-14, rtol=0)
    after = ref.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh, reset_after=True)
    assert (after - got).abs().max() > 1e-4  # genuinely a different function


@pytest.mark.parametrize("mode", ref.MODES)
def test_reference_streaming_chunked_equals_whole(mode):
    T, B, I, H = 11, 2, 3, 4
    G = ref.gate_count(mode)
    w = {"w_ih": torch.randn(G * H, I, dtype=D64), "w_hh": torch.randn(G * H, H, dtype=D64),
         "b_ih": torch.randn(G * H, dtype=D64), "b_hh": torch.randn(G * H, dtype=D64)}
    if mode == "lstm":
        w["w_peep"] = torch.randn(3, H, dtype=D64)
    x = torch.randn(T, B, I, dtype=D64)
    h0 = torch.randn(B, H, dtype=D64)
    c0 = torch.randn(B, H, dtype=D64) if mode == "lstm" else None
    whole, hn, cn = ref.layer(mode, x, h0, c0, **w)
    h, c, parts = h0, c0, []
    for a, b in [(0, 1), (1, 5), (5, 6), (6, 11)]:
        y, h, c = ref.layer(mode, x[a:b], h, c, **w)
        parts.append(y)
    assert torch.allclose(torch.cat(parts), whole, atol=1e-13, rtol=0)
    assert torch.allclose(h, hn, atol=1e-13, rtol=0)


@pytest.mark.parametrize("mode", ["rnn_tanh", "lstm", "gru", "gru_cho"])
@pytest.mark.parametrize("bidir", [False, True])
def test_reference_padding_never_leaks(mode, bidir):
    """SPEC: padded steps are skipped, not fed. Padding of NaN and inf changes nothing: the
    outputs (zeros past each length), final states and every gradient equal those with zero
    padding, and stay finite (a 0·NaN mask would spread NaN)."""
    T, B, I, H = 6, 3, 4, 5
    G = ref.gate_count(mode)
    D = 2 if bidir else 1
    ws = [{k: torch.randn(*s, dtype=D64, requires_grad=True)
           for k, s in (("w_ih", (G * H, I)), ("w_hh", (G * H, H)), ("b_ih", (G * H,)))}
          for _ in range(D)]
    lengths = torch.tensor([6, 2, 4])
    h0 = torch.randn(D, B, H, dtype=D64)
    c0 = torch.randn(D, B, H, dtype=D64) if mode == "lstm" else None
    x = torch.randn(T, B, I, dtype=D64)
    pad = torch.arange(T).unsqueeze(1) >= lengths  # (T, B)
    results = []
    for fill in (0.0, float("nan"), float("inf")):
        xf = x.masked_fill(pad.unsqueeze(2), fill)
        out, hn, cn = ref.recurrence(mode, xf, h0, c0, ws, 1, bidir, lengths=lengths)
        loss = out.sum() + hn.sum() + (cn.sum() if cn is not None else 0)
        grads = torch.autograd.grad(loss, [t for w in ws for t in w.values()])
        results.append([out, hn] + list(grads))
    for got in results[1:]:
        for a, b in zip(got, results[0]):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not results[0][0][pad].any()
