// Scaled dot-product attention on the CPU: the entry points. They check the inputs, build the
// mask and dropout descriptions, choose a kernel for the problem (dtype, query count, CPU) and
// allocate its outputs; the kernels are in attention_flash.cpp (tiles in float32/float64),
// attention_flash_bf16.cpp (bf16 tiles) and attention_decode.cpp (at most 8 queries, row by
// row), their shared pieces in attention_common.h.
#include "isa.h"

#include "bindings.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

#include "cpu/dtype.h"
#include "cpu/gemm.h"
#include "cpu/large_alloc.h"
#include "cpu/transpose.h"
#include "cpu/vec_math.h"
#include "cpu/attention_common.h"

namespace seqkern::cpu {
namespace {

using namespace attn;


// f(S{}) for the storage type S of K and V: bf16 or fp16 where the inputs are (kernels
// computing in float32 read them as stored and widen them in cache), else the compute type T.
template <typename T, typename F>
void with_kv_type(at::ScalarType kv, F&& f) {
  if constexpr (std::is_same_v<T, float>) {
    if (kv == at::kBFloat16) return f(c10::BFloat16{});
    if (kv == at::kHalf) return f(c10::Half{});
  }
  TORCH_CHECK(kv == c10::CppTypeToScalarType<T>::value, "seqkern attention: ", kv,
              " K and V need float32 compute");
  f(T{});
}

// ------------------------------------------------------------------ entry points -----------

// The type the fp32/fp64 kernels read K and V in: bf16 and fp16 as stored (the decode kernels
// widen them in registers, the tile kernels block by block: kv_rows), else the compute type.
// Forward and backward must agree: the backward recomputes the forward's scores.
at::ScalarType kv_storage_type(at::ScalarType t) {
  return at::isReducedFloatingType(t) ? t : compute_type(t, "seqkern attention");
}

// t in type ct with its last dimension contiguous (a no-op for the usual layouts, including
// slices of a packed qkv projection and views into a KV cache; see contiguous_as).
at::Tensor rows_contiguous(const at::Tensor& t, at::ScalarType ct) {
  if (t.scalar_type() == ct && t.stride(-1) == 1 && !t.is_neg()) return t;
  return contiguous_as(t, ct);  // (which materialises a negative-bit view)
}

Dims check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "seqkern attention: q, k, v must be 4-D (B, H, L, D), got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "seqkern attention: the CPU kernel needs CPU tensors");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "seqkern attention: q, k, v dtypes differ: ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble ||
                  q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "seqkern attention: dtype must be float32, float64, bfloat16 or float16, got ",
              q.scalar_type());
  Dims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  TORCH_CHECK(k.size(0) == d.B && v.size(0) == d.B, "seqkern attention: batch sizes differ");
  TORCH_CHECK(k.size(3) == d.D, "seqkern attention: q and k head dims differ: ", d.D, " vs ", k.size(3));
  TORCH_CHECK(v.size(1) == d.Hkv && v.size(2) == d.Lk, "seqkern attention: k and v shapes differ: ",
              k.sizes(), " vs ", v.sizes());
  // (no heads at all is an empty result, as torch's)
  TORCH_CHECK((d.Hkv > 0 && d.Hq % d.Hkv == 0) || (d.Hq == 0 && d.Hkv == 0),
              "seqkern attention: query heads (", d.Hq,
              ") must be a multiple of key/value heads (", d.Hkv, ")");
  return d;
}

template <typename T>
Mask<T> make_mask(const Dims& d, const c10::optional<at::Tensor>& attn_mask,
                  const c10::optional<at::Tensor>& key_lengths, bool is_causal, bool bottom_right,
                  int64_t window, at::Tensor& mask_hold, at::Tensor& len_hold) {
  Mask<T> m;
  m.Lq = d.Lq;
  m.Lk = d.Lk;
  m.causal = is_causal;
  m.offset = bottom_right ? d.Lk - d.Lq : 0;
  TORCH_CHECK(window >= 0, "seqkern attention: window must be >= 1 (0 for none), got ", window);
  m.window = window;
  if (key_lengths.has_value() && key_lengths->defined()) {
    TORCH_CHECK(key_lengths->dim() == 1 && key_lengths->size(0) == d.B,
                "seqkern attention: key_lengths must have shape (", d.B, "), got ", key_lengths->sizes());
    len_hold = key_lengths->to(at::kLong).contiguous();
    m.key_len = len_hold.data_ptr<int64_t>();
  }
  if (attn_mask.has_value() && attn_mask->defined()) {
    const at::Tensor& am = *attn_mask;
    TORCH_CHECK(am.dim() <= 4, "seqkern attention: attn_mask must have at most 4 dims, got ", am.sizes());
    if (am.scalar_type() == at::kBool) {
      mask_hold = am.expand({d.B, d.Hq, d.Lq, d.Lk});
      m.bmask = mask_hold.data_ptr<bool>();
    } else {
      // convert before expanding so a broadcast mask is not materialised at full size
      // (resolve_neg: a negative-bit view's memory holds -mask), into block-cache memory: a
      // (1, 8, 2048, 2048) bf16 mask's fp32 copy through .to() cost more than the attention,
      // mapped one page fault at a time (63 against 36 ms given in fp32, torch 27)
      constexpr auto mt = c10::CppTypeToScalarType<T>::value;
      mask_hold = (am.scalar_type() == mt ? am.resolve_neg() : contiguous_as(am, mt))
                      .expand({d.B, d.Hq, d.Lq, d.Lk});
      m.amask = mask_hold.data_ptr<T>();
    }
    m.sb = mask_hold.stride(0);
    m.sh = mask_hold.stride(1);
    m.sq = mask_hold.stride(2);
    m.sk = mask_hold.stride(3);
  }
  return m;
}

Dropout make_dropout(double p, const c10::optional<at::Tensor>& seed) {
  TORCH_CHECK(p >= 0 && p <= 1, "seqkern attention: dropout_p must be in [0, 1], got ", p);
  if (p == 0) return Dropout();
  TORCH_CHECK(seed.has_value() && seed->defined() && seed->numel() == 1 &&
                  seed->scalar_type() == at::kLong,
              "seqkern attention: dropout_p > 0 needs dropout_seed, a one-element int64 tensor");
  return Dropout(p, static_cast<uint64_t>(seed->item<int64_t>()));
}

std::tuple<at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& key_lengths,
    bool is_causal, bool bottom_right, int64_t window, double scale, double dropout_p,
    const c10::optional<at::Tensor>& dropout_seed, bool out_fp32, bool need_lse) {
  const Dims d = check_inputs(q, k, v);
  const Dropout drop = make_dropout(dropout_p, dropout_seed);
  const at::ScalarType ct = compute_type(q.scalar_type(), "seqkern attention");
  const bool decode = use_decode(d, q.scalar_type(), !out_fp32);
  // A bf16/fp16 output in float32, as computed: the backward's Δ = rowsum(dO ⊙ O) is a
  // difference of near-equal terms for a peaked row, and with O rounded to bf16 it kept that
  // rounding (dK 3.9× torch's error at Dv ≠ D, where torch computes exactly).
  const bool wide = out_fp32 && at::isReducedFloatingType(q.scalar_type());
  const at::ScalarType out_type = wide ? at::kFloat : q.scalar_type();
  // The bf16 tile kernels write their output themselves (bf16, or float32 if wide), the decode
  // kernel in the storage type; the fp32 tile kernel writes float32.
  const bool amx = !decode && q.scalar_type() == at::kBFloat16 && amx_usable(d);
  const bool narrow_out = decode && at::isReducedFloatingType(q.scalar_type());  // decode writes it too
  at::Tensor out = empty_large({d.B, d.Hq, d.Lq, d.Dv},
                               q.options().dtype(amx ? out_type : narrow_out ? q.scalar_type() : ct));
  // Eager inference has no use for the log-sum-exp; the tile kernels then skip it (a vector
  // log per 8 rows: ~5 % of the fp32 forward at L = 128). (The decode kernels always write it.)
  const bool lse_rows = need_lse || decode;
  at::Tensor lse = at::empty(lse_rows ? at::IntArrayRef({d.B, d.Hq, d.Lq}) : at::IntArrayRef({0}),
                             q.options().dtype(at::kDouble));
  if (out.numel() == 0 || (lse_rows && lse.numel() == 0) || d.Lk == 0) {  // no keys: every row sees nothing
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {contiguous_as(out, out_type), lse};
  }
  if (amx) {
    at::Tensor mask_hold, len_hold;
    const auto mask = make_mask<float>(d, attn_mask, key_lengths, is_causal, bottom_right, window,
                                       mask_hold, len_hold);
    auto kernel = bf16_few_queries(d, !out_fp32) ? forward_kernel_bf16_few
                                                                 : forward_kernel_bf16_amx;
    kernel(d, rows_contiguous(q, at::kBFloat16), rows_contiguous(k, at::kBFloat16),
           rows_contiguous(v, at::kBFloat16), static_cast<float>(scale), mask, drop, out, lse);
    return {out, lse};
  }
  // K and V in bf16/fp16 are widened block by block in the tile loop (kv_rows), once per query
  // tile that visits the block; where each block meets several query tiles it is cheaper to
  // widen them once up front (exact either way, so the backward, which widens block by block,
  // recomputes the same scores). Measured, bf16 causal D=64, 2 threads, per tile → up front:
  // B=1 H=16 L=4096 150.0 → 140.4 ms, B=4 H=8 L=1024 21.3 → 20.5; but B=8 H=4 L=256 1.67 → 2.21
  // (the conversion pass costs more than 4 query tiles' widening).
  const bool widen_once = !decode && at::isReducedFloatingType(q.scalar_type()) &&
                          d.group() * ((d.Lq + kBlockQ - 1) / kBlockQ) >= 16;
  const at::ScalarType kv_type = widen_once ? ct : kv_storage_type(q.scalar_type());
  at::Tensor qc = rows_contiguous(q, ct);
  at::Tensor kc = rows_contiguous(k, kv_type), vc = rows_contiguous(v, kv_type);
  at::Tensor mask_hold, len_hold;
  AT_DISPATCH_FLOATING_TYPES(ct, "seqkern_attention_forward", [&] {
    const auto mask = make_mask<scalar_t>(d, attn_mask, key_lengths, is_causal, bottom_right,
                                          window, mask_hold, len_hold);
    if (!decode) {
      with_kv_type<scalar_t>(kv_type, [&](auto s) {
        forward_kernel<scalar_t, decltype(s)>(d, qc, kc, vc, (scalar_t)scale, mask, drop, out, lse);
      });
    } else {
      with_kv_type<scalar_t>(kv_type, [&](auto s) {
        decode_forward_kernel<scalar_t, decltype(s)>(d, qc, kc, vc, (scalar_t)scale, mask, drop, out, lse);
      });
    }
  });
  // (the decode backward sums Δ from its weights and does not read O: a bf16 one widens here)
  return {contiguous_as(out, out_type), lse};
}

// Δ (B, H, L) in the compute type T: Δ_i = Σ_c dO_ic·O_ic per query row, read in the storage
// type S in place (no widened copies of dO and O).
template <typename T, typename S>
at::Tensor row_dots(const at::Tensor& a, const at::Tensor& b) {
  const int64_t B = a.size(0), H = a.size(1), L = a.size(2), E = a.size(3);
  at::Tensor out = at::empty({B, H, L}, a.options().dtype(c10::CppTypeToScalarType<T>::value));
  const Strides sa(a), sb(b);
  const S *A = a.data_ptr<S>(), *Bp = b.data_ptr<S>();
  T* O = out.data_ptr<T>();
  at::parallel_for(0, B * H * L, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t % L, h = (t / L) % H, bi = t / (L * H);
      O[t] = row_dot<T>(A + sa.at(bi, h, i), Bp + sb.at(bi, h, i), E);
    }
  });
  return out;
}

// The gradient of an additive attn_mask of at most 4 dims, in its own shape with leading 1s
// (so a caller reshapes it back); rows of `buffer` are per-thread copies when tasks share
// elements (see MaskGrad).
struct MaskGradBuffer {
  at::Tensor buffer;
  std::vector<int64_t> shape;
  template <typename T>
  MaskGrad<T> view(const Dims& d) {
    MaskGrad<T> g;
    g.data = buffer.data_ptr<T>();
    const int64_t full[4] = {d.B, d.Hq, d.Lq, d.Lk};
    int64_t st[4], stride = 1;
    for (int i = 3; i >= 0; --i) {
      st[i] = shape[i] == 1 && full[i] != 1 ? 0 : stride;
      stride *= shape[i];
    }
    g.sb = st[0], g.sh = st[1], g.sq = st[2], g.sk = st[3];
    if (buffer.size(0) > 1) g.per_thread = stride;
    return g;
  }
};

MaskGradBuffer mask_grad_buffer(const Dims& d, const c10::optional<at::Tensor>& attn_mask,
                                at::ScalarType ct) {
  TORCH_CHECK(attn_mask.has_value() && attn_mask->defined() && attn_mask->is_floating_point(),
              "seqkern attention_backward: mask_grad needs an additive (floating-point) attn_mask");
  MaskGradBuffer m;
  m.shape.assign(4 - attn_mask->dim(), 1);
  for (int64_t s : attn_mask->sizes()) m.shape.push_back(s);
  const bool shared = (m.shape[0] == 1 && d.B > 1) || (m.shape[1] == 1 && d.Hq > 1);
  const int64_t copies = shared ? at::get_num_threads() : 1;
  m.buffer = at::zeros({copies, m.shape[0] * m.shape[1] * m.shape[2] * m.shape[3]},
                       attn_mask->options().dtype(ct));
  return m;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& attn_mask,
    const c10::optional<at::Tensor>& key_lengths, bool is_causal, bool bottom_right,
    int64_t window, double scale, double dropout_p,
    const c10::optional<at::Tensor>& dropout_seed, bool mask_grad) {
  const Dims d = check_inputs(q, k, v);
  const at::ScalarType ct = compute_type(q.scalar_type(), "seqkern attention");
  const Dropout drop = make_dropout(dropout_p, dropout_seed);
  MaskGradBuffer mgrad;
  if (mask_grad) mgrad = mask_grad_buffer(d, attn_mask, ct);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.sizes() == at::IntArrayRef({d.B, d.Hq, d.Lq, d.Dv}),
              "seqkern attention_backward: grad_out/out must have shape (", d.B, ", ", d.Hq,
              ", ", d.Lq, ", ", d.Dv, "), got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({d.B, d.Hq, d.Lq}) && lse.scalar_type() == at::kDouble,
              "seqkern attention_backward: lse must be Double of shape (", d.B, ", ", d.Hq,
              ", ", d.Lq, "), got ", lse.scalar_type(), " ", lse.sizes());
  const int64_t g = d.Hq / std::max<int64_t>(d.Hkv, 1);
  // Split a key/value head's query group over several tasks only when there are too few
  // (batch, kv head) pairs to keep every thread busy; each split needs its own dK/dV buffer.
  const int64_t threads = at::get_num_threads();
  int64_t chunks = 1;
  if (d.B * d.Hkv < 4 * threads) chunks = std::min<int64_t>(g, (4 * threads + d.B * d.Hkv - 1) / std::max<int64_t>(d.B * d.Hkv, 1));
  chunks = std::max<int64_t>(chunks, 1);

  const bool direct = chunks == 1;  // else the chunks' partial dK, dV are summed
  const bool decode = use_decode(d, q.scalar_type(), /*inference=*/false);
  const bool amx = !decode && q.scalar_type() == at::kBFloat16 && amx_usable(d);
  // the bf16 tile kernel's dQ accumulator is as wide as its packed operands; backward_kernel
  // zeroes and scales its dQ rows itself, the others' are zeroed here and scaled after
  at::Tensor dq = empty_large({d.B, d.Hq, d.Lq, amx ? amx_width(d.D) : d.D}, q.options().dtype(ct));
  if (decode || amx) dq.zero_();
  at::Tensor dk_acc = empty_large({d.B, d.Hkv, chunks, d.Lk, d.D}, q.options().dtype(ct));
  at::Tensor dv_acc = empty_large({d.B, d.Hkv, chunks, d.Lk, d.Dv}, q.options().dtype(ct));
  if (dq.numel() == 0 || dk_acc.numel() == 0 || dv_acc.numel() == 0 || d.Lq == 0 || d.Lk == 0) {
    dq = dq.zero_().narrow(-1, 0, d.D);
    dk_acc.zero_();
    dv_acc.zero_();
  } else if (amx) {
    at::Tensor qb = rows_contiguous(q, at::kBFloat16), kb = rows_contiguous(k, at::kBFloat16),
               vb = rows_contiguous(v, at::kBFloat16), go = rows_contiguous(grad_out, at::kBFloat16);
    // Δ from the float32 output when the forward kept it (out_fp32), else from the bf16 one
    at::Tensor delta = out.scalar_type() == at::kFloat
        ? row_dots<float, float>(rows_contiguous(grad_out, at::kFloat), rows_contiguous(out, at::kFloat))
        : row_dots<float, c10::BFloat16>(go, rows_contiguous(out, at::kBFloat16));
    at::Tensor mask_hold, len_hold;
    const auto mask = make_mask<float>(d, attn_mask, key_lengths, is_causal, bottom_right, window,
                                       mask_hold, len_hold);
    const MaskGrad<float> mg = mask_grad ? mgrad.view<float>(d) : MaskGrad<float>();
    backward_kernel_bf16_amx(d, qb, kb, vb, go, lse.contiguous(), delta, mask, drop, mg,
                             static_cast<float>(scale), chunks, dq, dk_acc, dv_acc);
    dq = dq.mul_(scale).narrow(-1, 0, d.D);
  } else {
    const at::ScalarType kv_type = kv_storage_type(q.scalar_type());
    at::Tensor qc = rows_contiguous(q, ct), kc = rows_contiguous(k, kv_type),
               vc = rows_contiguous(v, kv_type);
    at::Tensor go = rows_contiguous(grad_out, ct);
    at::Tensor mask_hold, len_hold;
    AT_DISPATCH_FLOATING_TYPES(ct, "seqkern_attention_backward", [&] {
      const auto mask = make_mask<scalar_t>(d, attn_mask, key_lengths, is_causal, bottom_right,
                                            window, mask_hold, len_hold);
      const MaskGrad<scalar_t> mg = mask_grad ? mgrad.view<scalar_t>(d) : MaskGrad<scalar_t>();
      if (decode) {
        with_kv_type<scalar_t>(kv_type, [&](auto s) {
          decode_backward_kernel<scalar_t, decltype(s)>(d, qc, kc, vc, go, lse.contiguous(), mask,
                                                        drop, mg, (scalar_t)scale, chunks, dq,
                                                        dk_acc, dv_acc);
        });
        dq.mul_(scale);
      } else {
        const at::Tensor oc = rows_contiguous(out, ct);
        with_kv_type<scalar_t>(kv_type, [&](auto s) {
          backward_kernel<scalar_t, decltype(s)>(d, qc, kc, vc, go, oc, lse.contiguous(), mask,
                                                 drop, mg, (scalar_t)scale, chunks, dq, dk_acc,
                                                 dv_acc);
        });
      }
    });
  }
  at::Tensor dk = direct ? dk_acc.squeeze(2) : dk_acc.sum(2);
  at::Tensor dv = direct ? dv_acc.squeeze(2) : dv_acc.sum(2);
  at::Tensor dmask = mask_grad ? mgrad.buffer.sum(0).view(mgrad.shape).to(attn_mask->scalar_type())
                               : at::empty({0}, q.options());
  return {contiguous_as(dq, q.scalar_type()), contiguous_as(dk, q.scalar_type()), contiguous_as(dv, q.scalar_type()), dmask};
}

// Materialises what the kernels regenerate tile by tile; for tests and the reference.
at::Tensor attention_dropout_mask(int64_t B, int64_t H, int64_t Lq, int64_t Lk, double p,
                                  const at::Tensor& seed) {
  const Dropout drop = make_dropout(p, seed);
  at::Tensor keep = at::empty({B, H, Lq, Lk}, at::kFloat);
  float* K = keep.data_ptr<float>();
  at::parallel_for(0, B * H * Lq, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      if (drop.active) keep_along_row(drop.row_key(row), 0, Lk, drop.threshold, K + row * Lk);
      else std::fill(K + row * Lk, K + (row + 1) * Lk, 1.0f);
    }
  });
  return keep.to(at::kBool);
}

}  // namespace
}  // namespace seqkern::cpu

namespace seqkern {
void register_attention(pybind11::module_& m) {
  m.def("attention_bf16_tiles", &cpu::bf16_tiles_supported,
        "Whether bfloat16 attention runs on bf16 tiles here (AMX through oneDNN's brgemm, or AVX512_BF16)");
  m.def("attention_forward", &cpu::attention_forward, kReleaseGil,
        "Flash-style attention forward: (q, k, v, attn_mask, key_lengths, is_causal, "
        "bottom_right, window, scale, dropout_p, dropout_seed, out_fp32) -> (out, lse); out in "
        "float32 for bf16/fp16 inputs when out_fp32 (what the backward wants), else q's dtype",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("attn_mask"),
        pybind11::arg("key_lengths"), pybind11::arg("is_causal"), pybind11::arg("bottom_right"),
        pybind11::arg("window"), pybind11::arg("scale"), pybind11::arg("dropout_p") = 0.0,
        pybind11::arg("dropout_seed") = pybind11::none(), pybind11::arg("out_fp32") = false,
        pybind11::arg("need_lse") = true);
  m.def("attention_backward", &cpu::attention_backward, kReleaseGil,
        "Attention backward recomputing scores from lse: -> (dq, dk, dv, d attn_mask or empty)",
        pybind11::arg("grad_out"), pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"),
        pybind11::arg("out"), pybind11::arg("lse"), pybind11::arg("attn_mask"),
        pybind11::arg("key_lengths"), pybind11::arg("is_causal"), pybind11::arg("bottom_right"),
        pybind11::arg("window"), pybind11::arg("scale"), pybind11::arg("dropout_p") = 0.0,
        pybind11::arg("dropout_seed") = pybind11::none(), pybind11::arg("mask_grad") = false);
  m.def("attention_dropout_mask", &cpu::attention_dropout_mask, kReleaseGil,
        "The keep pattern (True = kept) that attention dropout with this p and seed applies to "
        "weights of shape (B, H, Lq, Lk)",
        pybind11::arg("B"), pybind11::arg("H"), pybind11::arg("Lq"), pybind11::arg("Lk"),
        pybind11::arg("dropout_p"), pybind11::arg("dropout_seed"));
}
}  // namespace seqkern
