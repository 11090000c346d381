// The cell equations of SPEC.md on one vector of hidden units, forward and backward. Both
// time loops (the fused float32 one in rnn_fused.cpp and the per-step BLAS one in rnn.cpp)
// call these, so each equation is written once.
#pragma once
#include "cpu/vec_math.h"

namespace seqkern::cpu {

template <typename T>
struct LstmStep {
  Vec<T> i, f, g, o, c, m;  // gates (activated), new cell, o ⊙ tanh(c) (= h without projection)
};

// ai..ao: pre-activations without the peephole terms; cp: previous cell; peep: (3, H) at
// unit u (or null).
template <typename T>
SEQKERN_INLINE LstmStep<T> lstm_step(Vec<T> ai, Vec<T> af, Vec<T> ag, Vec<T> ao, Vec<T> cp,
                             const T* peep, int64_t H, int64_t u, int64_t n) {
  if (peep) {
    ai = ai + load(peep + u, n) * cp;
    af = af + load(peep + H + u, n) * cp;
  }
  LstmStep<T> s;
  s.i = sigmoid(ai);
  s.f = sigmoid(af);
  s.g = tanh(ag);
  s.c = s.f * cp + s.i * s.g;
  if (peep) ao = ao + load(peep + 2 * H + u, n) * s.c;
  s.o = sigmoid(ao);
  s.m = s.o * tanh(s.c);
  return s;
}

template <typename T>
struct LstmGrad {
  Vec<T> di, df, dg, do_, dc_prev;  // gradients of the four pre-activations, and of c_{t-1}
};

// dm: gradient reaching o ⊙ tanh(c); dc: gradient reaching c from the next step.
template <typename T>
SEQKERN_INLINE LstmGrad<T> lstm_step_backward(Vec<T> dm, Vec<T> dc, Vec<T> i, Vec<T> f, Vec<T> g,
                                      Vec<T> o, Vec<T> cp, Vec<T> cn, const T* peep, int64_t H,
                                      int64_t u, int64_t n) {
  const Vec<T> one(T(1));
  auto tc = tanh(cn);
  LstmGrad<T> r;
  r.do_ = dm * tc * o * (one - o);
  auto dct = dc + dm * o * (one - tc * tc);
  if (peep) dct = dct + r.do_ * load(peep + 2 * H + u, n);
  r.di = dct * g * i * (one - i);
  r.df = dct * cp * f * (one - f);
  r.dg = dct * i * (one - g * g);
  r.dc_prev = dct * f;
  if (peep) r.dc_prev = r.dc_prev + r.di * load(peep + u, n) + r.df * load(peep + H + u, n);
  return r;
}

// h' = n + z ⊙ (h − n), shared by both GRU conventions once n is known.
template <typename T>
SEQKERN_INLINE Vec<T> gru_mix(Vec<T> n, Vec<T> z, Vec<T> hp) {
  return n + z * (hp - n);
}

template <typename T>
struct GruGrad {
  Vec<T> dn_pre, dz_pre, dh_direct;  // through tanh, through σ, and the z ⊙ h path
};

template <typename T>
SEQKERN_INLINE GruGrad<T> gru_mix_backward(Vec<T> dh, Vec<T> n, Vec<T> z, Vec<T> hp) {
  const Vec<T> one(T(1));
  return {dh * (one - z) * (one - n * n), dh * (hp - n) * z * (one - z), dh * z};
}

// PyTorch-convention GRU, the gate gradients of one step. The saved gates at unit u are r, z,
// n (activated) and hlin = W_hn·h + b_hn (4·H wide). Writes the input-side pre-activation
// gradients to dx (r, z, n; G·H wide), the recurrent-side ones to drec (r, z, and n·r, which is
// what reaches W_hn·h), and the direct z ⊙ h path to dh; the W_hh path is added by a GEMM.
template <typename T>
SEQKERN_INLINE void gru_step_backward(Vec<T> dh_in, const T* gates, const T* hp, T* dx, T* drec,
                                      T* dh, int64_t H, int64_t u, int64_t n) {
  const auto r = load(gates + u, n), hlin = load(gates + 3 * H + u, n);
  const auto g = gru_mix_backward(dh_in, load(gates + 2 * H + u, n), load(gates + H + u, n),
                                  load(hp + u, n));
  const auto dr = g.dn_pre * hlin * r * (Vec<T>(T(1)) - r);
  store(dr, dx + u, n);
  store(g.dz_pre, dx + H + u, n);
  store(g.dn_pre, dx + 2 * H + u, n);
  store(dr, drec + u, n);
  store(g.dz_pre, drec + H + u, n);
  store(g.dn_pre * r, drec + 2 * H + u, n);
  store(g.dh_direct, dh + u, n);
}

// Four vectors of unit u into the first four H-wide blocks of a row: LSTM's activated gates
// i, f, g, o or their pre-activation gradients, GRU's r, z, n and W_hn·h + b_hn (what the
// backward reads).
template <typename T>
SEQKERN_INLINE void store_gate_blocks(T* row, int64_t H, int64_t u, int64_t n, const Vec<T>& a,
                                      const Vec<T>& b, const Vec<T>& c, const Vec<T>& d) {
  store(a, row + u, n);
  store(b, row + H + u, n);
  store(c, row + 2 * H + u, n);
  store(d, row + 3 * H + u, n);
}

template <typename T>
SEQKERN_INLINE void store_lstm_gates(const LstmStep<T>& s, T* gates, int64_t H, int64_t u,
                                     int64_t n) {
  store_gate_blocks(gates, H, u, n, s.i, s.f, s.g, s.o);
}

template <typename T>
SEQKERN_INLINE void store_lstm_grads(const LstmGrad<T>& g, T* dgates, int64_t H, int64_t u,
                                     int64_t n) {
  store_gate_blocks(dgates, H, u, n, g.di, g.df, g.dg, g.do_);
}

template <typename T>
SEQKERN_INLINE Vec<T> rnn_activation(Vec<T> a, bool relu_act) {
  return relu_act ? relu(a) : tanh(a);
}

// Gradient through the activation from its output y.
template <typename T>
SEQKERN_INLINE Vec<T> rnn_activation_backward(Vec<T> dh, Vec<T> y, bool relu_act) {
  // (zero only where y <= 0: a NaN y passes dh on, as torch's threshold_backward does)
  if (relu_act) return Vec<T>::blendv(dh, Vec<T>(T(0)), y <= Vec<T>(T(0)));
  return dh * (Vec<T>(T(1)) - y * y);
}

}  // namespace seqkern::cpu
