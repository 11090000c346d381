"""The bf16 products the recurrent and attention kernels share (csrc/cpu/gemm.cpp): the tile
product (oneDNN's brgemm on AMX, vdpbf16ps register tiles on AVX512_BF16) and the large bf16
GEMM with fp32 results, against float64 products of the same bf16 values."""
import pytest
import torch

from seqkern import registry
from seqkern._ext import cpu_flags

from conftest import requires_cpu_ext

pytestmark = requires_cpu_ext


def _C():
    import seqkern._ext as ext
    return ext._C


def within_torch_error(got, a, b):
    """got's error against the float64 product is at most ~2x torch's float32 matmul's."""
    exact = a.double() @ b.double()
    torch32 = (a.float() @ b.float()).double()
    err = (got.double() - exact).abs().max().item()
    ref_err = (torch32 - exact).abs().max().item()
    floor = 1e-6 * max(1.0, exact.abs().max().item())
    assert err <= 2 * ref_err + floor, (err, ref_err)


SIZES = [1, 2, 3, 16, 17, 64, 97, 130]


@pytest.mark.parametrize("a_trans", [False, True])
@pytest.mark.parametrize("b_trans", [False, True])
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (3, 17, 5), (17, 64, 2), (97, 130, 33),
                                   (130, 97, 64), (200, 300, 257), (5, 513, 300), (300, 3, 600),
                                   (33, 70, 4097)])
def test_gemm_bf16_matches_float64(a_trans, b_trans, M, N, K):
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    a = torch.randn(M, K, generator=g).bfloat16()
    b = torch.randn(K, N, generator=g).bfloat16()
    a_st = a.t().contiguous() if a_trans else a
    b_st = b.t().contiguous() if b_trans else b
    got = _C().gemm_bf16(a_st, b_st, a_trans, b_trans)
    assert got.dtype == torch.float32 and got.shape == (M, N)
    within_torch_error(got, a, b)


def test_gemm_bf16_empty_inner_dimension_gives_zeros():
    got = _C().gemm_bf16(torch.empty(4, 0, dtype=torch.bfloat16),
                         torch.empty(0, 5, dtype=torch.bfloat16), False, False)
    assert torch.equal(got, torch.zeros(4, 5))


needs_tiles = pytest.mark.skipif(
    not (registry.availability("cpu")[0] and _C().bf16_tiles_supported()),
    reason="no bf16 tiles on this CPU (neither AMX nor AVX512_BF16)")


@needs_tiles
@pytest.mark.parametrize("add_c", [False, True])
@pytest.mark.parametrize("M", [1, 5, 6, 7, 13, 64])
@pytest.mark.parametrize("N", [1, 15, 16, 33, 64, 65, 200])
@pytest.mark.parametrize("K", [1, 2, 31, 64, 129])
def test_tile_product_matches_float64(add_c, M, N, K):
    g = torch.Generator().manual_seed(M * 7 + N * 131 + K)
    a = torch.randn(M, K, generator=g).bfloat16()
    b = torch.randn(K, N, generator=g).bfloat16()
    c0 = torch.randn(M, N, generator=g)
    c = c0.clone()
    _C().bf16_tile_product(a, b, c, add_c)
    within_torch_error(c - c0 if add_c else c, a, b)


@needs_tiles
def test_tile_product_odd_k_ignores_what_follows_a_row():
    """With odd K the last k pairs with a zero: the element after each row of A (here a NaN in
    the padding of a wider matrix) must not reach the product."""
    a = torch.randn(4, 7).bfloat16()
    a_nan = torch.cat([a, torch.full((4, 1), float("nan")).bfloat16()], 1)
    b = torch.randn(7, 20).bfloat16()
    c = torch.empty(4, 20)
    _C().bf16_tile_product(a_nan[:, :7], b, c, False)  # rows 8 apart
    assert torch.isfinite(c).all()
    within_torch_error(c, a, b)


def test_hooks_reject_bad_operands_by_name():
    bf = torch.bfloat16
    with pytest.raises(RuntimeError, match="gemm_bf16: inner sizes differ"):
        _C().gemm_bf16(torch.ones(3, 4, dtype=bf), torch.ones(5, 2, dtype=bf), False, False)
    with pytest.raises(RuntimeError, match="gemm_bf16: two 2-D bfloat16"):
        _C().gemm_bf16(torch.ones(3, 4), torch.ones(4, 2, dtype=bf), False, False)
    if _C().bf16_tiles_supported():
        with pytest.raises(RuntimeError, match="bf16_tile_product: a with unit column stride"):
            _C().bf16_tile_product(torch.ones(3, 4, dtype=bf), torch.ones(4, 2, dtype=bf),
                                   torch.zeros(3, 2, dtype=torch.float64), False)
        with pytest.raises(RuntimeError, match="bf16_tile_product: a .* do not form"):
            _C().bf16_tile_product(torch.ones(3, 4, dtype=bf), torch.ones(5, 2, dtype=bf),
                                   torch.zeros(3, 2), False)


@pytest.mark.skipif(not ({"amx_tile", "amx_bf16"} <= cpu_flags()), reason="no AMX on this CPU")
def test_amx_cpus_run_seqkerns_own_tiles():
    """On a CPU with AMX, a native build runs whole-tile products on seqkern's own tile loop,
    the shapes the recurrent kernels pad to (the tests of those kernels then exercise it)."""
    if not _C().amx_tiles_built():
        pytest.skip("built for a target without AMX (SEQKERN_ISA)")
    assert tuple(_C().bf16_tile_multiples()) == (16, 16, 32)


@needs_tiles
def test_tile_products_of_mixed_shapes_on_one_thread():
    """Whole-tile products (seqkern's AMX loop where there is AMX) and others (oneDNN's brgemm)
    in turn on one thread without releasing the tiles in between, as the GRU loop does: each
    path must load its own tile configuration after the other used the registers."""
    g = torch.Generator().manual_seed(5)
    shapes = [(32, 64, 64), (5, 15, 31), (16, 48, 96), (7, 64, 64), (64, 16, 32), (13, 33, 2),
              (32, 64, 64)]
    for add_c in (False, True):
        for M, N, K in shapes:
            a = torch.randn(M, K, generator=g).bfloat16()
            b = torch.randn(K, N, generator=g).bfloat16()
            c0 = torch.randn(M, N, generator=g)
            c = c0.clone()
            _C().bf16_tile_product(a, b, c, add_c, release=False)
            within_torch_error(c - c0 if add_c else c, a, b)
    _C().bf16_tile_product(a, b, c, add_c, release=True)


@needs_tiles
@pytest.mark.parametrize("other", ["gemm_bf16", "matmul", "linear", "sdpa"])
def test_tile_product_after_other_amx_users(other):
    """Other AMX users on the thread (MKL's bf16 GEMM, oneDNN's matmul, torch's attention) load
    or release the tile registers without telling anyone: a tile product after them must load
    its own configuration again (running on theirs, or on released tiles, is SIGILL or wrong
    tile shapes)."""
    g = torch.Generator().manual_seed(11)
    a = torch.randn(64, 64, generator=g).bfloat16()
    b = torch.randn(64, 64, generator=g).bfloat16()
    x = torch.randn(1, 2, 96, 64, generator=g).bfloat16()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the other op on this same thread
    try:
        c = torch.empty(64, 64)
        _C().bf16_tile_product(a, b, c, False, release=False)
        if other == "gemm_bf16":
            _C().gemm_bf16(x[0, 0], x[0, 1].t().contiguous(), False, False)
        elif other == "matmul":
            x[0, 0] @ x[0, 1].t()
        elif other == "linear":
            torch.nn.functional.linear(x[0, 0], x[0, 1])
        else:
            torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)
        _C().bf16_tile_product(a, b, c, False, release=True)
        within_torch_error(c, a, b)
    finally:
        torch.set_num_threads(threads)
