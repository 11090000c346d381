// The pybind11 module seqkern._C. Each op family adds its functions in its own
// register_<family>() so this file stays a table of contents.
#include "isa.h"

#include <torch/extension.h>

#include "bindings.h"
#include "cpu/gemm.h"
#include "cpu/large_alloc.h"
#include "cpu/rnn.h"

namespace seqkern {
void register_attention(pybind11::module_& m);
void register_conv(pybind11::module_& m);
}  // namespace seqkern

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "seqkern C++ CPU kernels";
  m.def("build_isa", [] { return std::string(SEQKERN_ISA); },
        "Instruction set the kernels were compiled for (avx512, avx2 or generic)");
  m.def("required_cpu_flags", [] { return std::string(seqkern::required_cpu_flags()); },
        "CPU flags (/proc/cpuinfo spelling) this build may use");
  m.def("blas", [] { return std::string(seqkern::cpu::blas_name()); },
        "The BLAS the kernels call (mkl, resolved from torch, or aten)");
  m.def("recurrent_forward", &seqkern::cpu::recurrent_forward, seqkern::kReleaseGil);
  m.def("recurrent_backward", &seqkern::cpu::recurrent_backward, seqkern::kReleaseGil);
  m.def("recurrent_module_forward", &seqkern::cpu::recurrent_module_forward, seqkern::kReleaseGil,
        "A recurrent module's no-grad forward with zero states, all layers in one call: (mode, "
        "input, weights (6 per layer and direction), num_layers, bidirectional, batch_first) -> "
        "[output, h_n, c_n or empty]");
  m.def("cell_step", &seqkern::cpu::cell_step, seqkern::kReleaseGil,
        "One step of a cell: (mode, x, h, c, w_ih, w_hh, b_ih, b_hh, save) -> [h', c' or "
        "empty, saved (what cell_backward needs) or empty]");
  m.def("cell_backward", &seqkern::cpu::cell_backward, seqkern::kReleaseGil,
        "The backward of one cell_step: (mode, dh, dc, saved, h_prev, c_prev, w_ih, w_hh, "
        "need_dx) -> [dgx, drec, dx or empty, dh_prev, dc_prev or empty]");
  m.def("recurrent_bf16_tiles", &seqkern::cpu::recurrent_bf16_tiles,
        "Whether bfloat16 recurrences (B >= 8) run their products on bf16 tiles (AMX through "
        "oneDNN's brgemm, or AVX512_BF16)");
  // Test hooks for the bf16 products the kernels share (float32 results, no autograd).
  m.def("gemm_bf16", [](const at::Tensor& a, const at::Tensor& b, bool a_trans, bool b_trans) {
    TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.scalar_type() == at::kBFloat16 &&
                b.scalar_type() == at::kBFloat16, "gemm_bf16: two 2-D bfloat16 matrices");
    const auto A = a.contiguous(), B = b.contiguous();
    const int64_t M = a_trans ? A.size(1) : A.size(0), K = a_trans ? A.size(0) : A.size(1);
    const int64_t N = b_trans ? B.size(0) : B.size(1);
    TORCH_CHECK((b_trans ? B.size(1) : B.size(0)) == K, "gemm_bf16: inner sizes differ");
    at::Tensor C = at::full({M, N}, 7.0f, a.options().dtype(at::kFloat));
    TORCH_CHECK(seqkern::cpu::gemm_bf16(a_trans, b_trans, M, N, K, A.data_ptr<at::BFloat16>(),
                                         A.size(1), B.data_ptr<at::BFloat16>(), B.size(1),
                                         C.data_ptr<float>(), N),
                "gemm_bf16: no bf16 GEMM in this build");
    return C;
  });
  m.def("bf16_tiles_supported", &seqkern::cpu::bf16_tiles_supported,
        "Whether bf16_tile_product runs here (AMX, or AVX512_BF16)");
  m.def("bf16_tile_multiples", [] {
    const auto t = seqkern::cpu::bf16_tile_multiples();
    return std::make_tuple(t.m, t.n, t.k);
  }, "(M, N, K) multiples at which bf16_tile_product runs whole tiles (seqkern's AMX loop)");
  m.def("amx_tiles_built", &seqkern::cpu::amx_tiles_built,
        "Whether this build holds seqkern's AMX tile loop");
  m.def("bf16_tile_product", [](const at::Tensor& a, const at::Tensor& b, at::Tensor c, bool add_c,
                                bool release) {
    // a (M × K, rows a.stride(0) apart) and b (K × N) bf16, b packed here; c (M × N) float32,
    // updated in place; without release the thread keeps its tile configuration for the next
    // call (as the kernels' loops do)
    TORCH_CHECK(seqkern::cpu::bf16_tiles_supported(), "bf16_tile_product: not on this CPU");
    TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2 && a.stride(1) == 1 &&
                a.stride(0) >= a.size(1) && b.is_contiguous() && c.is_contiguous() &&
                a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16 &&
                c.scalar_type() == at::kFloat,
                "bf16_tile_product: a with unit column stride, contiguous b (bf16), c (float32)");
    const int64_t M = a.size(0), K = a.size(1), N = b.size(1), Kp = (K + 1) / 2 * 2;
    TORCH_CHECK(b.size(0) == K && c.size(0) == M && c.size(1) == N,
                "bf16_tile_product: a ", a.sizes(), ", b ", b.sizes(), " and c ", c.sizes(),
                " do not form (M × K)·(K × N) = (M × N)");
    const int64_t Np = N + 3;  // a leading dimension wider than N
    std::vector<at::BFloat16> packed(Kp * Np);
    seqkern::cpu::pack_vnni(b.data_ptr<at::BFloat16>(), N, K, N, Kp, Np, packed.data());
    seqkern::cpu::bf16_tile_product(M, N, K, a.stride(0), Np, N, add_c, a.data_ptr<at::BFloat16>(),
                                    packed.data(), c.data_ptr<float>());
    if (release) seqkern::cpu::bf16_tile_release();
  }, py::arg("a"), py::arg("b"), py::arg("c"), py::arg("add_c"), py::arg("release") = true);
  m.def("alloc_cached_bytes", &seqkern::cpu::large_alloc_cached_bytes,
        "Bytes of freed large output blocks kept for reuse");
  m.def("alloc_release_cache", &seqkern::cpu::large_alloc_release_cache,
        "Return the cached large output blocks to the OS");
  m.def("_alloc_hold_lock", &seqkern::cpu::large_alloc_hold_lock, seqkern::kReleaseGil,
        "Tests: hold the block cache's lock for `seconds`", py::arg("seconds"));
  m.def("cast_like", [](const at::Tensor& t, const at::Tensor& like) {
    return seqkern::cpu::contiguous_as(t, like.scalar_type());
  }, seqkern::kReleaseGil,
        "t in like's dtype, contiguous (t itself if it is already), converted into cached "
        "large-block memory: torch's .to() maps a large result one page fault at a time",
        py::arg("t"), py::arg("like"));
  seqkern::register_attention(m);
  seqkern::register_conv(m);
}
