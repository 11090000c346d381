#pragma once
#include "isa.h"

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace seqkern::cpu {

// One layer, one direction, whole sequence. Returns
// {out (N, Hs), h_n (B, Hs), c_n (B, H) or empty, ws_gates, ws_cells, ws_hprev};
// the three workspaces are empty unless `save` (training) and are what backward needs.
std::vector<at::Tensor> recurrent_forward(
    const std::string& mode, const at::Tensor& x, const at::Tensor& batch_sizes,
    const at::Tensor& h0, const c10::optional<at::Tensor>& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& w_peep,
    const c10::optional<at::Tensor>& w_hr, bool reverse, bool save);

// Returns {dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_peep, dw_hr} (undefined where the
// forward had no such input). h_n: the forward's final states, (B, H), read by the RNN cells
// only (the gated cells take any tensor there); not the output, which a caller may change.
std::vector<at::Tensor> recurrent_backward(
    const std::string& mode, const c10::optional<at::Tensor>& grad_out,
    const c10::optional<at::Tensor>& grad_hn, const c10::optional<at::Tensor>& grad_cn,
    const at::Tensor& x, const at::Tensor& batch_sizes, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& w_peep,
    const c10::optional<at::Tensor>& w_hr, const at::Tensor& h_n, const at::Tensor& ws_gates,
    const at::Tensor& ws_cells, const at::Tensor& ws_hprev, bool reverse);

// One step of a cell (rnn_tanh, rnn_relu, lstm, gru), float32, float64 or bfloat16 (fp32
// math): {h', c' (LSTM) or empty, saved}. With `save` (training), `saved` holds what
// cell_backward needs (LSTM: i, f, g, o, c'; GRU: r, z, n, W_hn·h + b_hn, h; RNN: h'; fp32
// for bf16), not the states, which the caller may change in place. Up to 4 rows
// (float32/64) one fused kernel, more two library GEMMs and the cell.
std::vector<at::Tensor> cell_step(const std::string& mode, const at::Tensor& x,
                                  const at::Tensor& h, const c10::optional<at::Tensor>& c,
                                  const at::Tensor& w_ih, const at::Tensor& w_hh,
                                  const c10::optional<at::Tensor>& b_ih,
                                  const c10::optional<at::Tensor>& b_hh, bool save);

// The backward of one cell_step, given dh' (and dc' for LSTM, or none), the step's saved
// tensor, its input c (LSTM) and h_prev (read for its shape and dtype only: any (B, H)
// tensor of h's dtype): {dgx, drec, dx (empty unless need_dx), dh, dc (LSTM) or empty}. dgx and drec are the gradients of x·W_ihᵀ + b_ih and of h·W_hhᵀ + b_hh (the same
// tensor except for GRU); the weight gradients are left to the caller (dW_ih = dgxᵀ·x,
// dW_hh = drecᵀ·h, summed over steps).
std::vector<at::Tensor> cell_backward(const std::string& mode, const at::Tensor& dh,
                                      const c10::optional<at::Tensor>& dc,
                                      const at::Tensor& saved, const at::Tensor& h_prev,
                                      const c10::optional<at::Tensor>& c_prev,
                                      const at::Tensor& w_ih, const at::Tensor& w_hh,
                                      bool need_dx);

// A whole module's forward without autograd, zero initial states and equal lengths (what
// torch.nn.LSTM(x) does under no_grad): every layer and direction in one call. input: (T, B, I),
// (B, T, I) with batch_first, or (T, I) unbatched; weights: per layer and direction in order,
// recurrent_forward's six (w_ih, w_hh, b_ih, b_hh, w_peep, w_hr), None where absent.
// Returns {output, h_n, c_n (LSTM) or empty} shaped as torch.nn's.
std::vector<at::Tensor> recurrent_module_forward(
    const std::string& mode, const at::Tensor& input,
    const std::vector<c10::optional<at::Tensor>>& weights, int64_t num_layers, bool bidirectional,
    bool batch_first);

// Whether bfloat16 recurrences at B ≥ 8 run their products on bf16 tiles here (AMX or AVX512_BF16)
// (AVX-512 build, a CPU oneDNN packs bf16 for, SEQKERN_RNN_AMX not "0").
bool recurrent_bf16_tiles();

}  // namespace seqkern::cpu
