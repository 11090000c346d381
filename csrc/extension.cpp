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
        "One inference step of a cell for at most 4 rows: (mode, x, h, c, w_ih, w_hh, b_ih, "
        "b_hh) -> [h', c' or empty]");
  m.def("recurrent_bf16_amx", &seqkern::cpu::recurrent_bf16_amx,
        "Whether bfloat16 recurrences (B >= 8) run their products on oneDNN brgemm (AMX) tiles");
  m.def("alloc_cached_bytes", &seqkern::cpu::large_alloc_cached_bytes,
        "Bytes of freed large output blocks kept for reuse");
  m.def("alloc_release_cache", &seqkern::cpu::large_alloc_release_cache,
        "Return the cached large output blocks to the OS");
  seqkern::register_attention(m);
  seqkern::register_conv(m);
}
