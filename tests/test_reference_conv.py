"""The reference convolution is the definition the kernels are tested against, so it is itself
checked against torch: nn.Conv1d / F.conv1d on the explicitly left-padded input, in float64."""
import pytest
import torch
import torch.nn.functional as F

from seqkern.reference import conv as ref

TOL = dict(rtol=0, atol=1e-10)


def torch_causal(x, w, b, d, groups, initial_state=None):
    P = (w.shape[2] - 1) * d
    xp = F.pad(x, (P, 0)) if initial_state is None else torch.cat([initial_state, x], 2)
    return F.conv1d(xp, w, b, dilation=d, groups=groups)


CASES = [  # B, C_in, C_out, L, K, d, groups
    (1, 1, 1, 1, 1, 1, 1),
    (2, 3, 5, 17, 3, 2, 1),
    (2, 16, 16, 17, 4, 8, 4),
    (3, 16, 32, 100, 5, 3, 16),
    (2, 64, 64, 1000, 2, 1024, 64),      # receptive field longer than L
    (1, 130, 130, 2, 7, 5, 130),
    (2, 6, 9, 33, 7, 1, 3),
]


@pytest.mark.parametrize("B,Cin,Cout,L,K,d,groups", CASES)
@pytest.mark.parametrize("with_state", [False, True])
def test_reference_matches_padded_nn_conv1d(B, Cin, Cout, L, K, d, groups, with_state):
    torch.manual_seed(0)
    x = torch.randn(B, Cin, L, dtype=torch.float64)
    conv = torch.nn.Conv1d(Cin, Cout, K, dilation=d, groups=groups, dtype=torch.float64)
    state = torch.randn(B, Cin, (K - 1) * d, dtype=torch.float64) if with_state else None
    want = torch_causal(x, conv.weight, conv.bias, d, groups, state)
    got = ref.causal_conv1d(x, conv.weight, conv.bias, d, groups, initial_state=state)
    torch.testing.assert_close(got, want, **TOL)
    if groups == Cin == Cout:
        got_dw = ref.depthwise_causal_conv1d(x, conv.weight, conv.bias, d, initial_state=state)
        torch.testing.assert_close(got_dw, want, **TOL)


@pytest.mark.parametrize("activation,fn", [("relu", torch.relu), ("silu", F.silu),
                                           ("tanh", torch.tanh), (None, lambda y: y)])
def test_reference_activation(activation, fn):
    torch.manual_seed(1)
    x = torch.randn(2, 4, 20, dtype=torch.float64)
    w = torch.randn(6, 2, 3, dtype=torch.float64)
    want = fn(torch_causal(x, w, None, 2, 2))
    torch.testing.assert_close(ref.causal_conv1d(x, w, None, 2, 2, activation), want, **TOL)


def test_reference_output_never_reads_the_future():
    torch.manual_seed(2)
    x = torch.randn(1, 3, 30, dtype=torch.float64)
    w = torch.randn(4, 3, 3, dtype=torch.float64)
    y = ref.causal_conv1d(x, w, dilation=4)
    x2 = x.clone()
    x2[:, :, 20:] += 1.0
    y2 = ref.causal_conv1d(x2, w, dilation=4)
    torch.testing.assert_close(y[:, :, :20], y2[:, :, :20], **TOL)
    assert not torch.allclose(y[:, :, 20:], y2[:, :, 20:])


def test_reference_wavenet_block_matches_torch_modules():
    torch.manual_seed(3)
    R, G, S, K, d = 8, 6, 5, 2, 4
    conv = torch.nn.Conv1d(R, 2 * G, K, dilation=d, dtype=torch.float64)
    skip = torch.nn.Conv1d(G, S, 1, dtype=torch.float64)
    res = torch.nn.Conv1d(G, R, 1, dtype=torch.float64)
    x = torch.randn(2, R, 40, dtype=torch.float64)
    h = torch_causal(x, conv.weight, conv.bias, d, 1)
    z = torch.tanh(h[:, :G]) * torch.sigmoid(h[:, G:])
    got_res, got_skip = ref.wavenet_block(x, conv.weight, conv.bias, skip.weight, skip.bias,
                                          res.weight, res.bias, d)
    torch.testing.assert_close(got_skip, skip(z), **TOL)
    torch.testing.assert_close(got_res, x + res(z), **TOL)


def test_reference_step_and_chunks_equal_whole_sequence():
    torch.manual_seed(4)
    B, C, L, K, d = 2, 4, 23, 3, 3
    x = torch.randn(B, C, L, dtype=torch.float64)
    w = torch.randn(5, C, K, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    whole = ref.causal_conv1d(x, w, b, d, activation="tanh")
    state = torch.zeros(B, C, (K - 1) * d, dtype=torch.float64)
    steps = []
    for t in range(L):
        y, state = ref.causal_conv1d_step(x[:, :, t], state, w, b, d, activation="tanh")
        steps.append(y)
    torch.testing.assert_close(torch.stack(steps, 2), whole, **TOL)
    torch.testing.assert_close(state, x[:, :, L - (K - 1) * d:], **TOL)
    y1, s1 = ref.causal_conv1d(x[:, :, :5], w, b, d, activation="tanh", return_final_state=True)
    y2 = ref.causal_conv1d(x[:, :, 5:], w, b, d, activation="tanh", initial_state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], 2), whole, **TOL)
