import os
import subprocess
import sys

import pytest
import torch

import seqkern
from seqkern import registry


def test_version():
    assert isinstance(seqkern.__version__, str) and seqkern.__version__.count(".") == 2


def test_auto_selects_cpu_when_built():
    expected = "cpu" if seqkern.availability("cpu")[0] else "reference"
    assert registry.select("rnn", "cpu") == expected


def test_use_backend_overrides_and_restores():
    before = registry.select("rnn", "cpu")
    with seqkern.use_backend("reference"):
        assert registry.select("rnn", "cpu") == "reference"
    assert registry.select("rnn", "cpu") == before


def test_env_variable(monkeypatch):
    monkeypatch.setenv("SEQKERN_BACKEND", "reference")
    assert registry.select("attention", "cpu") == "reference"
    monkeypatch.setenv("SEQKERN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="SEQKERN_BACKEND: unknown backend 'nonsense'"):
        registry.select("rnn", "cpu")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        with seqkern.use_backend("gpu"):
            pass


def test_unavailable_triton_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a CUDA device makes triton available")
    with pytest.raises(registry.BackendUnavailableError, match="triton"):
        with seqkern.use_backend("triton"):
            pass


def test_missing_extension_falls_back_with_one_warning(tmp_path):
    # A fresh interpreter where importing seqkern._C fails: import still works, ops run on the
    # reference, and exactly one warning is emitted however many ops run.
    code = r"""
import sys, warnings, builtins
real_import = builtins.__import__
def fake_import(name, globals=None, locals=None, fromlist=(), level=0):
    if name == "seqkern" and fromlist and "_C" in fromlist:
        raise ImportError("simulated: extension not built")
    return real_import(name, globals, locals, fromlist, level)
builtins.__import__ = fake_import
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import torch, seqkern
    m = seqkern.nn.GRU(3, 4)
    for _ in range(3):
        m(torch.randn(5, 2, 3))
    ws = [x for x in w if "seqkern" in str(x.message)]
    msgs = [str(x.message) for x in ws]
print(seqkern.registry.select("rnn", "cpu"), len(msgs), ws[0].filename if ws else "",
      msgs[0] if msgs else "")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    backend, count, where, msg = out.stdout.strip().split(" ", 3)
    assert backend == "reference" and count == "1" and "simulated" in msg
    assert where == "<string>"  # the warning points at the caller's line, not seqkern's own


def test_missing_extension_file_is_reported_as_not_built():
    """No .so at all reads as "not built", not as Python's "partially initialized module
    (most likely due to a circular import)" that importing a missing submodule gives."""
    code = r"""
import importlib.util
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "seqkern._C" else real(name, *a)
import seqkern
from seqkern import _ext
print(_ext._C is None, _ext.load_error)
try:
    seqkern.ops.attention.dropout_keep_mask((1, 1, 2, 2), 0.5, None)
except RuntimeError as e:
    print("dropout_keep_mask:", e)
"""
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True,
                         text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.strip().splitlines()
    assert first.startswith("True the C++ extension seqkern._C is not built")
    assert "dropout_keep_mask needs seqkern's C++ extension" in second


def test_cli_info_and_bench_help():
    out = subprocess.run([sys.executable, "-m", "seqkern", "info"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "seqkern " + seqkern.__version__ in out.stdout and "AVX-512=" in out.stdout
    assert "rnn" in out.stdout
    out = subprocess.run([sys.executable, "-m", "seqkern", "bench", "--ops", "nosuch"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "unknown suite" in out.stderr


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "seqkern", *args], capture_output=True,
                          text=True, timeout=300, env=env)


def test_cli_with_a_bad_backend_or_output_fails_before_timing(tmp_path):
    """A bad SEQKERN_BACKEND is reported by `info` and refused by `bench` before any case
    runs; so is an unwritable --json path, and an --ops list that names nothing."""
    env = dict(os.environ, SEQKERN_BACKEND="bogus")
    out = _cli("info", env=env)
    assert out.returncode == 0 and "error: " in out.stdout, out.stderr
    out = _cli("bench", "gru", "--threads", "1", env=env)
    assert out.returncode == 2 and "cannot benchmark" in out.stderr and "bogus" in out.stderr
    assert "Traceback" not in out.stderr
    out = _cli("bench", "gru", "--json", str(tmp_path / "no" / "such" / "dir.json"))
    assert out.returncode == 2 and "cannot write --json" in out.stderr
    assert "seqkern bench" not in out.stdout  # (refused before the run began)
    for ops in ("", ","):
        out = _cli("bench", "--ops", ops)
        assert out.returncode == 2 and "names no suite" in out.stderr


def test_bench_json_is_replaced_only_by_a_finished_run(tmp_path, monkeypatch):
    """An interrupted run leaves an earlier --json file as it was (written through a
    temporary file at the end); a finished one replaces it."""
    from seqkern.bench import harness

    path = tmp_path / "bench.json"
    path.write_text('{"rows": ["earlier"]}')

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        harness.main(["gru"], False, str(path), None, False)
    assert path.read_text() == '{"rows": ["earlier"]}' and len(list(tmp_path.iterdir())) == 1
    monkeypatch.setattr(harness, "run", lambda *a, **k: [])
    assert harness.main(["gru"], False, str(path), None, False) == 0
    assert '"rows": []' in path.read_text() and len(list(tmp_path.iterdir())) == 1


def test_bench_table_shows_a_case_note():
    from seqkern.bench import harness

    row = {"suite": "x", "op": "wavenet generate", "shape": {"L": 1}, "dtype": "float32",
           "threads": 1, "seqkern_ms": 1.0, "torch_ms": 40.0, "reference_ms": None,
           "speedup": 40.0, "gflops": None, "gbps": None, "torch_gflops": None,
           "note": "torch = re-running the stack on the receptive field"}
    assert "note, wavenet generate: torch = re-running the stack" in harness.table([row])


def test_pytest_collects_the_benchmark_suites():
    """`pytest benchmarks/` (README) finds the bench_*.py files: the quick grid, seqkern and
    torch each."""
    from seqkern.bench import harness

    root = os.path.dirname(os.path.dirname(__file__))
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", "benchmarks"], capture_output=True,
                         text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stdout + out.stderr
    collected = {line.split("[", 1)[1].rstrip("]") for line in out.stdout.splitlines() if "::" in line}
    quick = {f"{c.op}-{c.shape_str}".replace(" ", "_") for c in harness.load_cases(False) if c.quick}
    for impl in ("seqkern", "torch"):
        assert {f"{q}-{impl}" for q in quick} <= collected
    assert {c.rsplit("-", 1)[0] for c in collected} == quick  # (the quick grid, no more)


def test_required_cpu_flags_name_the_bit_instructions():
    """Every -march that gives AVX2 gives BMI1/BMI2 (the compiler uses them: shlx, andn), so a
    CPU without them must be refused, not crash with SIGILL."""
    if seqkern._ext._C is None:
        pytest.skip("extension not built")
    flags = seqkern._ext._C.required_cpu_flags().split()
    if "avx2" in flags:
        assert {"bmi1", "bmi2", "popcnt"} <= set(flags)


def test_bench_runs_one_small_case(tmp_path):
    from seqkern.bench import harness, rnn

    case = [c for c in rnn.cases(full=False) if c.suite == "gru"][0]
    rows = harness.run([case], full=False)
    assert rows[0]["seqkern_ms"] > 0 and rows[0]["torch_ms"] > 0 and rows[0]["speedup"] > 0
    assert "gru" in harness.table(rows)


def test_bench_cell_loop_cases_run():
    """The --full grid's cell loops (inference and training) run, both implementations."""
    from seqkern.bench import rnn

    cell_cases = [c for c in rnn.cases(full=True) if "cell loop" in c.op]
    assert {c.op for c in cell_cases} == {f"{n} cell loop {w}" for n in ("lstm", "gru", "rnn")
                                          for w in ("fwd", "fwd+bwd")}
    assert {c.dtype for c in cell_cases} == {torch.float32, torch.bfloat16}
    for c in cell_cases:
        if c.shape["B"] == 1:
            fns = c.make()
            assert set(fns) == {"seqkern", "torch"}
            for f in fns.values():
                f()


def test_extension_refused_on_cpu_without_its_isa(monkeypatch):
    """A build that uses CPU features the running CPU lacks must not be loaded (it would die
    with SIGILL); the loader reports why and the registry falls back to the reference."""
    from seqkern import _ext

    if _ext._C is None:
        pytest.skip("extension not built")
    required = set(_ext._C.required_cpu_flags().split())
    if not required:
        pytest.skip("generic build: uses no optional CPU features")
    ext = _ext._C
    monkeypatch.setattr(_ext, "_cpu_flags", lambda: {"sse2"})
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "load_error", None)
    _ext._load()
    assert _ext._C is None
    assert "CPU features this CPU lacks" in _ext.load_error
    assert sorted(required)[0] in _ext.load_error
    assert registry.availability("cpu")[0] is False
    monkeypatch.setattr(_ext, "_cpu_flags", lambda: required | {"sse2"})
    _ext._load()
    assert _ext._C is ext


def test_kernels_from_two_python_threads_equal_sequential_calls():
    """The C++ kernels run with the GIL released: calls from two Python threads overlap, and
    must give exactly what sequential calls give (no shared scratch between calls)."""
    import threading

    import seqkern

    torch.manual_seed(0)
    lstm = seqkern.nn.LSTM(16, 32, num_layers=2)
    conv = seqkern.nn.CausalConv1d(8, 8, 3, dilation=2)
    inputs = [(torch.randn(4, 3, 64, 32), torch.randn(50, 4, 16), torch.randn(2, 8, 300))
              for _ in range(2)]

    def run(i, out):
        q, x, c = inputs[i]
        with torch.no_grad():
            out[i] = [seqkern.ops.scaled_dot_product_attention(q, q, q, is_causal=True),
                      lstm(x)[0], conv(c)]

    want = [None, None]
    for i in range(2):
        run(i, want)
    for _ in range(3):
        got = [None, None]
        threads = [threading.Thread(target=run, args=(i, got)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for g, w in zip(got, want):
            for a, b in zip(g, w):
                assert torch.equal(a, b)


@pytest.mark.skipif(not registry.availability("cpu")[0], reason="no C++ extension")
def test_select_hands_dtypes_without_cpu_kernels_to_the_reference():
    for family in ("rnn", "attention", "conv"):
        assert registry.select(family, "cpu") == "cpu"
        assert registry.select(family, "cpu", torch.float32) == "cpu"
        assert registry.select(family, "cpu", torch.bfloat16) == "cpu"
        assert registry.select(family, "cpu", torch.float16) == "cpu"  # computed in float32
        assert registry.select(family, "cpu", torch.complex64) == "reference"
        with seqkern.use_backend("cpu"):
            assert registry.select(family, "cpu", torch.complex64) == "reference"


def test_negative_bit_views_are_read_as_their_values():
    """A real tensor can be a negative-bit view (z.conj().imag): its memory holds -x. Made by
    public ops it is strided (the imaginary parts of complex storage), so the kernels' entry
    copies it, which materialises the values: each family equals torch on it. See below for
    the dense ones."""
    import torch.nn.functional as F

    import seqkern.nn as snn
    from seqkern.ops import conv as conv_ops

    def neg_view(t):
        v = torch.complex(torch.zeros_like(t), -t).conj().imag  # = t, stored negated
        assert v.is_neg()
        return v

    torch.manual_seed(0)
    x = neg_view(torch.randn(3, 2, 5))
    m, t = snn.LSTM(5, 4), torch.nn.LSTM(5, 4)
    t.load_state_dict(m.state_dict())
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(m(x)[0], t(x)[0])
    q = neg_view(torch.randn(1, 2, 8, 16))
    k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    torch.testing.assert_close(seqkern.ops.scaled_dot_product_attention(q, k, v, is_causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))
    xc, w = neg_view(torch.randn(2, 4, 10)), torch.randn(4, 4, 3)
    torch.testing.assert_close(conv_ops.causal_conv1d(xc, w, None, 1, 1, None),
                               F.conv1d(F.pad(xc, (2, 0)), w))


def test_dense_negative_bit_views_are_read_as_their_values():
    """z.conj().imag is dense when every dim has size 1, so a plain .contiguous() would hand the
    kernels its negated memory. Cells, layers, attention and convolution, with and without
    gradients, must read it as its value (found by review: GRUCell gave another result)."""
    import torch.nn.functional as F

    import seqkern.nn as snn
    from seqkern.ops import conv as conv_ops

    def neg_view(shape):
        v = torch.randn(*shape, dtype=torch.complex64).conj().imag
        assert v.is_neg() and v.is_contiguous()
        return v

    torch.manual_seed(0)
    for tcls, scls in ((torch.nn.GRUCell, snn.GRUCell), (torch.nn.LSTMCell, snn.LSTMCell),
                       (torch.nn.RNNCell, snn.RNNCell)):
        t, s = tcls(1, 3), scls(1, 3)
        s.load_state_dict(t.state_dict())
        x = neg_view((1, 1))
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                for a, b in zip(torch.utils._pytree.tree_leaves(s(x)),
                                torch.utils._pytree.tree_leaves(t(x))):
                    torch.testing.assert_close(a, b)
    m, t = snn.GRU(1, 3), torch.nn.GRU(1, 3)
    t.load_state_dict(m.state_dict())
    x = neg_view((1, 1, 1))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(m(x)[0], t(x)[0])
            torch.testing.assert_close(m.step(x[0])[0], t(x)[0][0])
    q = neg_view((1, 1, 1, 1))
    k, v = torch.randn(1, 1, 3, 1), torch.randn(1, 1, 3, 1)
    torch.testing.assert_close(seqkern.ops.scaled_dot_product_attention(q, k, v),
                               F.scaled_dot_product_attention(q, k, v))
    # D = 1 rows have stride 1 however they are strided; and an additive mask
    qn, kn, vn = (torch.randn(2, 2, 5, dtype=torch.complex64).conj().imag.unsqueeze(-1)
                  for _ in range(3))
    mask = torch.randn(5, 5, dtype=torch.complex64).conj().imag
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(seqkern.ops.scaled_dot_product_attention(qn, kn, vn),
                                       F.scaled_dot_product_attention(qn, kn, vn))
            torch.testing.assert_close(
                seqkern.ops.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    xc, w = neg_view((1, 1, 1)), neg_view((1, 1, 1))
    torch.testing.assert_close(conv_ops.causal_conv1d(xc, w, None, 1, 1, None), F.conv1d(xc, w))


def test_env_variable_read_when_os_environ_is_replaced(monkeypatch):
    """A test may replace os.environ itself (mock.patch("os.environ", {...})): SEQKERN_BACKEND
    is still read from whatever os.environ is now."""
    import os

    monkeypatch.setattr(os, "environ", {"SEQKERN_BACKEND": "reference"})
    assert registry.requested() == "reference"
    assert registry.select("rnn", "cpu") == "reference"
    monkeypatch.setattr(os, "environ", {"SEQKERN_BACKEND": "bogus"})
    with pytest.raises(ValueError, match="SEQKERN_BACKEND: unknown backend 'bogus'"):
        registry.select("rnn", "cpu")
    monkeypatch.setattr(os, "environ", {})
    assert registry.requested() is None


def test_dense_float16_negative_bit_inputs_widened_correctly():
    """torch 2.13's copy_ from a dense float16 negative-bit tensor into float32 drops the bit;
    the kernels widen such inputs after resolving it (attention and recurrences compute fp16
    in fp32). Made with the private torch._neg_view: public ops make these only when every dim
    has size 1."""
    import torch.nn.functional as F

    import seqkern.nn as snn

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float16) for _ in range(3))
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    for args in ((torch._neg_view(-q), k, v), (q, torch._neg_view(-k), v), (q, k, torch._neg_view(-v))):
        got = seqkern.ops.scaled_dot_product_attention(*args, is_causal=True)
        torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)
    m = snn.LSTM(8, 8).half()
    x = torch.randn(5, 2, 8, dtype=torch.float16)
    with torch.no_grad():
        torch.testing.assert_close(m(torch._neg_view(-x))[0], m(x)[0])
