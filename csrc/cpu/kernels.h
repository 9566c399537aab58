// rnnkern CPU kernels, compiled once per instruction set.
//
// This file is included inside a namespace by isa_generic.cpp, isa_avx2.cpp and
// isa_avx512.cpp after RK_VEC_BYTES (the vector width in bytes) is defined; each includes the
// standard headers first, so nothing here pulls in library code compiled for the wrong ISA.
// Only GCC/Clang vector extensions, builtins and OpenMP are used.
//
// Legend: T time, B batch, I input size, H hidden, P state size (proj or H), G gates, V vocab.

typedef float vfloat __attribute__((vector_size(RK_VEC_BYTES)));
typedef double vdouble __attribute__((vector_size(RK_VEC_BYTES)));
typedef uint16_t vbf16 __attribute__((vector_size(RK_VEC_BYTES / 2)));
typedef uint32_t vuint32 __attribute__((vector_size(RK_VEC_BYTES)));

// bfloat16 weights are stored as their bit patterns.
struct bf16 {
  uint16_t bits;
};

template <typename S>
struct Vec;
template <>
struct Vec<float> {
  typedef vfloat type;
  static constexpr int lanes = RK_VEC_BYTES / 4;
};
template <>
struct Vec<double> {
  typedef vdouble type;
  static constexpr int lanes = RK_VEC_BYTES / 8;
};

template <typename VT, typename S>
inline VT load_vec(const S* p) {
  VT v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
template <typename VT>
inline VT load_vec(const bf16* p) {
  // bfloat16 -> float32 is a 16-bit left shift of the bit pattern.
  vbf16 h;
  __builtin_memcpy(&h, p, sizeof h);
  vuint32 u = __builtin_convertvector(h, vuint32) << 16;
  return (VT)u;
}

template <typename S>
inline S to_acc(S w) {
  return w;
}
inline float to_acc(bf16 w) {
  return __builtin_bit_cast(float, (uint32_t)w.bits << 16);
}

template <typename VT, typename S>
inline S hsum(VT v) {
  S s = 0;
  for (int i = 0; i < (int)(sizeof(VT) / sizeof(S)); ++i) s += v[i];
  return s;
}

// ---------------------------------------------------------------------------------------------
// C[m, n] = bias[n] + sum_k A[m, k] * W[n, k]  for m < M, n < N  ("A times W transposed").
// A [M, K] (row stride lda), W [N, K] (row stride ldw) in S or bf16, C [M, N] (stride ldc).
// Register tiles of R rows x NC weight rows, vectorised along K: the weights of a tile are
// loaded once per R rows of A. 4 x 3 keeps 12 accumulators + 3 weight vectors + 1 A vector in
// the 16 AVX2 registers; with M < 4 (decoding 1-3 streams) 1 x 4 keeps four weight streams in
// flight, which is what a bandwidth-bound matrix-vector product needs.

template <int R, int NC, typename S, typename W>
inline void gemm_tile(int m, int n, int K, const S* A, long lda, const W* Wt, long ldw,
                      const S* bias, S* C, long ldc) {
  typedef typename Vec<S>::type VT;
  constexpr int L = Vec<S>::lanes;
  VT acc[R][NC];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) acc[r][c] = VT{};
  const S* a0 = A + (long)m * lda;
  const W* w0 = Wt + (long)n * ldw;
  int k = 0;
  for (; k + L <= K; k += L) {
    VT w[NC];
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) w[c] = load_vec<VT>(w0 + c * ldw + k);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      VT x = load_vec<VT>(a0 + r * lda + k);
#pragma GCC unroll 16
      for (int c = 0; c < NC; ++c) acc[r][c] += x * w[c];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) {
      S s = hsum<VT, S>(acc[r][c]);
      for (int kk = k; kk < K; ++kk) s += a0[r * lda + kk] * to_acc(w0[c * ldw + kk]);
      if (bias) s += bias[n + c];
      C[(long)(m + r) * ldc + n + c] = s;
    }
}

template <int NC, typename S, typename W>
inline void gemm_columns(int M, int n, int K, const S* A, long lda, const W* Wt, long ldw,
                         const S* bias, S* C, long ldc) {
  int m = 0;
  for (; m + 4 <= M; m += 4) gemm_tile<4, NC>(m, n, K, A, lda, Wt, ldw, bias, C, ldc);
  for (; m < M; ++m) gemm_tile<1, NC>(m, n, K, A, lda, Wt, ldw, bias, C, ldc);
}

template <typename S, typename W>
void gemm_nt(int M, int N, int K, const S* A, long lda, const W* Wt, long ldw, const S* bias,
             S* C, long ldc) {
  int n = 0;
  if (M < 4) {
    for (; n + 4 <= N; n += 4) gemm_columns<4>(M, n, K, A, lda, Wt, ldw, bias, C, ldc);
  } else {
    for (; n + 3 <= N; n += 3) gemm_columns<3>(M, n, K, A, lda, Wt, ldw, bias, C, ldc);
  }
  for (; n < N; ++n) gemm_columns<1>(M, n, K, A, lda, Wt, ldw, bias, C, ldc);
}

// ---------------------------------------------------------------------------------------------
// Activations. float32: Cephes-style polynomials (max error about 2 ulp on the ranges used),
// written branch-free so `omp simd` loops vectorise them; libm's scalar expf would cost about
// as much as the recurrent GEMM at B=32, H=512. float64: libm.

inline float exp_approx(float x) {
  // Clamp so that the power of two below stays a normal float (NaN passes through).
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (exact for |n| < 2^22).
  const float shift = 12582912.0f;
  float t = x * 1.44269504088896341f + shift;
  float n = t - shift;
  int32_t ni = __builtin_bit_cast(int32_t, t) - __builtin_bit_cast(int32_t, shift);
  // r = x - n ln 2 in two pieces (Cody-Waite), |r| <= ln2 / 2.
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  float scale = __builtin_bit_cast(float, (ni + 127) << 23);
  return p * scale;
}

inline float sigmoid_act(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

inline float tanh_act(float x) {
  float ax = x < 0 ? -x : x;
  // |x| < 0.625: odd polynomial (Cephes tanhf); else 1 - 2 / (exp(2|x|) + 1) with the sign.
  float s = x * x;
  float p = -5.70498872745e-3f;
  p = p * s + 2.06390887954e-2f;
  p = p * s - 5.37397155531e-2f;
  p = p * s + 1.33314422036e-1f;
  p = p * s - 3.33332819422e-1f;
  float small = p * s * x + x;
  float big = 1.0f - 2.0f / (exp_approx(2.0f * ax) + 1.0f);
  big = x < 0 ? -big : big;
  return ax < 0.625f ? small : big;
}

inline double sigmoid_act(double x) { return 1.0 / (1.0 + __builtin_exp(-x)); }
inline double tanh_act(double x) { return __builtin_tanh(x); }

template <typename S>
inline S relu_act(S x) {
  return x < 0 ? S(0) : x;  // NaN stays NaN, as torch.relu
}

// ---------------------------------------------------------------------------------------------
// Pointwise cell updates for one batch row, units [u0, u1). gx and gh are the row's [G*H]
// input and recurrent pre-activations (gh includes b_hh). `active` is false past the row's
// length: the state is frozen and the output is zero.

// LSTM. out: h (no projection: masked, y written) or m = o * tanh(c) (projection: unmasked,
// the projection phase masks). c_prev and c_new may alias.
template <typename S>
inline void lstm_row_forward(int u0, int u1, int H, const S* gx, const S* gh, const S* c_prev,
                             S* c_new, const S* h_prev, S* out, S* y, S* gates, bool active) {
#pragma omp simd
  for (int u = u0; u < u1; ++u) {
    S i = sigmoid_act(gx[u] + gh[u]);
    S f = sigmoid_act(gx[H + u] + gh[H + u]);
    S g = tanh_act(gx[2 * H + u] + gh[2 * H + u]);
    S o = sigmoid_act(gx[3 * H + u] + gh[3 * H + u]);
    S cp = c_prev[u];
    S c = f * cp + i * g;
    S h = o * tanh_act(c);
    if (gates) {
      gates[u] = i;
      gates[H + u] = f;
      gates[2 * H + u] = g;
      gates[3 * H + u] = o;
    }
    c_new[u] = active ? c : cp;
    if (h_prev) {
      out[u] = active ? h : h_prev[u];
      if (y) y[u] = active ? h : S(0);
    } else {
      out[u] = h;
    }
  }
}

template <typename S>
inline void gru_row_forward(int u0, int u1, int H, const S* gx, const S* gh, const S* h_prev,
                            S* h_next, S* y, S* gates, S* hn, bool active) {
#pragma omp simd
  for (int u = u0; u < u1; ++u) {
    S r = sigmoid_act(gx[u] + gh[u]);
    S z = sigmoid_act(gx[H + u] + gh[H + u]);
    S n = tanh_act(gx[2 * H + u] + r * gh[2 * H + u]);
    S hp = h_prev[u];
    S h = (S(1) - z) * n + z * hp;
    if (gates) {
      gates[u] = r;
      gates[H + u] = z;
      gates[2 * H + u] = n;
    }
    if (hn) hn[u] = gh[2 * H + u];
    h_next[u] = active ? h : hp;
    if (y) y[u] = active ? h : S(0);
  }
}

template <typename S>
inline void rnn_row_forward(int cell, int u0, int u1, const S* gx, const S* gh, const S* h_prev,
                            S* h_next, S* y, bool active) {
  if (cell == kRNNTanh) {
#pragma omp simd
    for (int u = u0; u < u1; ++u) {
      S h = tanh_act(gx[u] + gh[u]);
      h_next[u] = active ? h : h_prev[u];
      if (y) y[u] = active ? h : S(0);
    }
  } else {
#pragma omp simd
    for (int u = u0; u < u1; ++u) {
      S h = relu_act(gx[u] + gh[u]);
      h_next[u] = active ? h : h_prev[u];
      if (y) y[u] = active ? h : S(0);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Work split: thread `tid` of `nt` owns [lo, hi) of n items, in multiples of 8 so that the
// pointwise loops vectorise and threads do not share cache lines of a row.
inline void split_range(int n, int nt, int tid, int* lo, int* hi) {
  int blocks = (n + 7) / 8;
  int per = blocks / nt, extra = blocks % nt;
  int b0 = tid * per + (tid < extra ? tid : extra);
  int b1 = b0 + per + (tid < extra ? 1 : 0);
  *lo = b0 * 8 < n ? b0 * 8 : n;
  *hi = b1 * 8 < n ? b1 * 8 : n;
}

// Threads for a recurrence whose per-step GEMM is M x N x K: one thread below ~64K
// multiply-adds per step, where an OpenMP barrier per step (about 1 us) would cost more
// than the split saves.
inline int threads_for(long M, long N, long K) {
  return M * N * K >= 65536 ? omp_get_max_threads() : 1;
}

// Processing step s of row b -> time index (past the length the map is the identity).
inline long time_index(int s, int T, const int64_t* lengths, int b, int reverse) {
  long len = lengths ? (long)lengths[b] : (long)T;
  if (s >= len) return s;
  return reverse ? len - 1 - s : s;
}

// ---------------------------------------------------------------------------------------------
// Training forward: all T steps of one layer, one parallel region, one barrier per step
// (two with a projection). Each thread owns a range of hidden units (all their gates) and,
// for the projection, a range of state units.

template <typename S>
void layer_forward(const ForwardArgs& a) {
  const int T = a.T, B = a.B, H = a.H, P = a.P, cell = a.cell;
  const int G = gate_count(cell), GH = G * H;
  const S* gx = (const S*)a.gx;
  const S* w_hh = (const S*)a.w_hh;
  const S* b_hh = (const S*)a.b_hh;
  const S* w_hr = (const S*)a.w_hr;
  S* y = (S*)a.y;
  S* hs = (S*)a.hs;
  S* aux = (S*)a.aux;
  S* gates = (S*)a.gates;
  S* gh = (S*)a.gh;
  S* mbuf = (S*)a.m;
  const bool lstm = cell == kLSTM, proj = w_hr != nullptr;
  const long BP = (long)B * P, BH = (long)B * H;
  auto slot = [&](int s) { return a.save ? (long)s : (long)(s & 1); };
  const int nth = threads_for(B, GH, P);

#pragma omp parallel num_threads(nth)
  {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    int u0, u1, p0, p1;
    split_range(H, nt, tid, &u0, &u1);
    split_range(P, nt, tid, &p0, &p1);
    for (int b = 0; b < B; ++b) {
      for (int p = p0; p < p1; ++p) hs[b * P + p] = ((const S*)a.h0)[b * P + p];
      if (lstm)
        for (int u = u0; u < u1; ++u) aux[b * H + u] = ((const S*)a.c0)[b * H + u];
    }
#pragma omp barrier
    for (int s = 0; s < T; ++s) {
      const S* h_prev = hs + slot(s) * BP;
      S* h_next = hs + slot(s + 1) * BP;
      if (u1 > u0)
        for (int g = 0; g < G; ++g)
          gemm_nt<S, S>(B, u1 - u0, P, h_prev, P, w_hh + (long)(g * H + u0) * P, P,
                        b_hh ? b_hh + g * H + u0 : nullptr, gh + g * H + u0, GH);
      for (int b = 0; b < B; ++b) {
        const bool active = !a.lengths || s < a.lengths[b];
        const long t = time_index(s, T, a.lengths, b, a.reverse);
        const S* gx_row = gx + (t * B + b) * GH;
        const S* gh_row = gh + (long)b * GH;
        S* y_row = y + (t * B + b) * P;
        if (lstm) {
          const S* c_prev = aux + slot(s) * BH + (long)b * H;
          S* c_new = aux + slot(s + 1) * BH + (long)b * H;
          S* g_row = gates ? gates + ((long)s * B + b) * GH : nullptr;
          if (proj)
            lstm_row_forward<S>(u0, u1, H, gx_row, gh_row, c_prev, c_new, nullptr,
                                mbuf + (long)b * H, nullptr, g_row, active);
          else
            lstm_row_forward<S>(u0, u1, H, gx_row, gh_row, c_prev, c_new, h_prev + b * P,
                                h_next + b * P, y_row, g_row, active);
        } else if (cell == kGRU) {
          S* g_row = a.save ? gates + ((long)s * B + b) * GH : nullptr;
          S* hn_row = a.save ? aux + ((long)s * B + b) * H : nullptr;
          gru_row_forward<S>(u0, u1, H, gx_row, gh_row, h_prev + b * P, h_next + b * P, y_row,
                             g_row, hn_row, active);
        } else {
          rnn_row_forward<S>(cell, u0, u1, gx_row, gh_row, h_prev + b * P, h_next + b * P,
                             y_row, active);
        }
      }
      if (proj) {
#pragma omp barrier
        if (p1 > p0)
          gemm_nt<S, S>(B, p1 - p0, H, mbuf, H, w_hr + (long)p0 * H, H, nullptr, h_next + p0, P);
        for (int b = 0; b < B; ++b) {
          const bool active = !a.lengths || s < a.lengths[b];
          S* y_row = y + (time_index(s, T, a.lengths, b, a.reverse) * B + b) * P;
          for (int p = p0; p < p1; ++p) {
            if (!active) h_next[b * P + p] = h_prev[b * P + p];
            y_row[p] = active ? h_next[b * P + p] : S(0);
          }
        }
      }
#pragma omp barrier
    }
    // Rows past their length never had their late time steps written above (their time index
    // maps to the processing step, which was written with zeros), so y is complete here.
    const S* h_last = hs + slot(T) * BP;
    for (int b = 0; b < B; ++b) {
      for (int p = p0; p < p1; ++p) ((S*)a.h_n)[b * P + p] = h_last[b * P + p];
      if (lstm)
        for (int u = u0; u < u1; ++u)
          ((S*)a.c_n)[b * H + u] = aux[slot(T) * BH + (long)b * H + u];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Training backward: the sequential part of BPTT (dgx, dh0, dc0, and the per-step inputs of
// the weight-gradient GEMMs), two barriers per step (three with a projection).

template <typename S>
inline void lstm_row_backward(int u0, int u1, int H, const S* gates, const S* c_prev,
                              const S* c_new, const S* dm, S* dc, S* dpre, S* dgx, bool active) {
#pragma omp simd
  for (int u = u0; u < u1; ++u) {
    S i = gates[u], f = gates[H + u], g = gates[2 * H + u], o = gates[3 * H + u];
    S tc = tanh_act(c_new[u]);
    S d = dm[u];
    S d_o = d * tc;
    S dct = dc[u] + d * o * (S(1) - tc * tc);
    S di = dct * g, dg = dct * i, df = dct * c_prev[u];
    S pi = di * i * (S(1) - i), pf = df * f * (S(1) - f);
    S pg = dg * (S(1) - g * g), po = d_o * o * (S(1) - o);
    pi = active ? pi : S(0);
    pf = active ? pf : S(0);
    pg = active ? pg : S(0);
    po = active ? po : S(0);
    dpre[u] = pi;
    dpre[H + u] = pf;
    dpre[2 * H + u] = pg;
    dpre[3 * H + u] = po;
    dgx[u] = pi;
    dgx[H + u] = pf;
    dgx[2 * H + u] = pg;
    dgx[3 * H + u] = po;
    dc[u] = active ? dct * f : dc[u];
  }
}

template <typename S>
inline void gru_row_backward(int u0, int u1, int H, const S* gates, const S* hn, const S* h_prev,
                             const S* dht, S* dpre, S* dgx, S* dgh, bool active) {
#pragma omp simd
  for (int u = u0; u < u1; ++u) {
    S r = gates[u], z = gates[H + u], n = gates[2 * H + u];
    S d = dht[u];
    S dn = d * (S(1) - z);
    S dz = d * (h_prev[u] - n);
    S pn = dn * (S(1) - n * n);
    S pr = pn * hn[u] * r * (S(1) - r);
    S pz = dz * z * (S(1) - z);
    pr = active ? pr : S(0);
    pz = active ? pz : S(0);
    pn = active ? pn : S(0);
    dgx[u] = pr;
    dgx[H + u] = pz;
    dgx[2 * H + u] = pn;
    dpre[u] = pr;
    dpre[H + u] = pz;
    dpre[2 * H + u] = pn * r;
    dgh[u] = pr;
    dgh[H + u] = pz;
    dgh[2 * H + u] = pn * r;
  }
}

template <typename S>
inline void rnn_row_backward(int cell, int u0, int u1, const S* h_new, const S* dht, S* dpre,
                             S* dgx, bool active) {
#pragma omp simd
  for (int u = u0; u < u1; ++u) {
    S h = h_new[u];
    S deriv = cell == kRNNTanh ? S(1) - h * h : (h > 0 ? S(1) : S(0));
    S p = active ? dht[u] * deriv : S(0);
    dpre[u] = p;
    dgx[u] = p;
  }
}

template <typename S>
void layer_backward(const BackwardArgs& a) {
  const int T = a.T, B = a.B, H = a.H, P = a.P, cell = a.cell;
  const int G = gate_count(cell), GH = G * H;
  const S* hs = (const S*)a.hs;
  const S* aux = (const S*)a.aux;
  const S* gates = (const S*)a.gates;
  const S* w_hh_t = (const S*)a.w_hh_t;
  const S* w_hr_t = (const S*)a.w_hr_t;
  const S* dy = (const S*)a.dy;
  S* dgx = (S*)a.dgx;
  S* dgh = (S*)a.dgh;
  S* dh_proj = (S*)a.dh_proj;
  S* ring = (S*)a.dh_ring;
  S* dht = (S*)a.dh_total;
  S* dpre = (S*)a.dpre;
  S* dm = (S*)a.dm;
  S* dc = (S*)a.dc0;  // the running dc lives in the dc0 output
  const bool lstm = cell == kLSTM, proj = w_hr_t != nullptr;
  const long BP = (long)B * P, BH = (long)B * H;
  const int nth = threads_for(B, GH, P);

#pragma omp parallel num_threads(nth)
  {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    int u0, u1, p0, p1;
    split_range(H, nt, tid, &u0, &u1);
    split_range(P, nt, tid, &p0, &p1);
    for (int b = 0; b < B; ++b) {
      for (int p = p0; p < p1; ++p) ring[b * P + p] = ((const S*)a.dh_n)[b * P + p];
      if (lstm)
        for (int u = u0; u < u1; ++u) dc[b * H + u] = ((const S*)a.dc_n)[b * H + u];
    }
#pragma omp barrier
    for (int s = T - 1; s >= 0; --s) {
      const int k = T - 1 - s;
      const S* dh_cur = ring + (k & 1) * BP;
      S* dh_next = ring + ((k + 1) & 1) * BP;
      // Phase A: dh_total = dh + dy, (projection) dm = dh_total @ W_hr, pointwise -> dpre.
      if (proj) {
        for (int b = 0; b < B; ++b) {
          const bool active = !a.lengths || s < a.lengths[b];
          const long t = time_index(s, T, a.lengths, b, a.reverse);
          for (int p = p0; p < p1; ++p) {
            S v = dh_cur[b * P + p] + dy[(t * B + b) * P + p];
            dht[b * P + p] = v;
            dh_proj[(t * B + b) * P + p] = active ? v : S(0);
          }
        }
#pragma omp barrier
        if (u1 > u0)
          gemm_nt<S, S>(B, u1 - u0, P, dht, P, w_hr_t + (long)u0 * P, P, nullptr, dm + u0, H);
      } else {
        for (int b = 0; b < B; ++b) {
          const long t = time_index(s, T, a.lengths, b, a.reverse);
          for (int u = u0; u < u1; ++u)
            dht[b * P + u] = dh_cur[b * P + u] + dy[(t * B + b) * P + u];
        }
      }
      for (int b = 0; b < B; ++b) {
        const bool active = !a.lengths || s < a.lengths[b];
        const long t = time_index(s, T, a.lengths, b, a.reverse);
        const S* g_row = gates ? gates + ((long)s * B + b) * GH : nullptr;
        S* dgx_row = dgx + (t * B + b) * GH;
        S* dpre_row = dpre + (long)b * GH;
        if (lstm) {
          lstm_row_backward<S>(u0, u1, H, g_row, aux + (long)s * BH + (long)b * H,
                               aux + (long)(s + 1) * BH + (long)b * H,
                               (proj ? dm + (long)b * H : dht + (long)b * P), dc + (long)b * H,
                               dpre_row, dgx_row, active);
        } else if (cell == kGRU) {
          gru_row_backward<S>(u0, u1, H, g_row, aux + ((long)s * B + b) * H,
                              hs + (long)s * BP + (long)b * P, dht + (long)b * P, dpre_row,
                              dgx_row, dgh + (t * B + b) * GH, active);
        } else {
          rnn_row_backward<S>(cell, u0, u1, hs + (long)(s + 1) * BP + (long)b * P,
                              dht + (long)b * P, dpre_row, dgx_row, active);
        }
      }
#pragma omp barrier
      // Phase B: dh_prev = dpre @ W_hh (+ dh_total * z for the GRU); frozen past the length.
      if (p1 > p0)
        gemm_nt<S, S>(B, p1 - p0, GH, dpre, GH, w_hh_t + (long)p0 * GH, GH, nullptr,
                      dh_next + p0, P);
      for (int b = 0; b < B; ++b) {
        const bool active = !a.lengths || s < a.lengths[b];
        const S* z_row = cell == kGRU ? gates + ((long)s * B + b) * GH + H : nullptr;
        for (int p = p0; p < p1; ++p) {
          S v = dh_next[b * P + p];
          if (z_row) v += dht[b * P + p] * z_row[p];
          dh_next[b * P + p] = active ? v : dh_cur[b * P + p];
        }
      }
#pragma omp barrier
    }
    const S* dh_last = ring + (T & 1) * BP;
    for (int b = 0; b < B; ++b)
      for (int p = p0; p < p1; ++p) ((S*)a.dh0)[b * P + p] = dh_last[b * P + p];
  }
}

// ---------------------------------------------------------------------------------------------
// Decoder: one step of L stacked layers (+ head) for B streams, inside a parallel region.
// Layer l reads its own state from h_cur[l] and its input from h_next[l - 1] (written this
// step), writes h_next[l]; c is updated in place (each unit by the thread that owns it).

template <typename W>
inline void decoder_step_body(const DecoderArgs& a, const int64_t* tokens, const float* x,
                              const float* h_cur, float* h_next, bool with_head, int nt,
                              int tid) {
  const int L = a.L, B = a.B, H = a.H, P = a.P, cell = a.cell;
  const int G = gate_count(cell), GH = G * H;
  const long BP = (long)B * P, BH = (long)B * H;
  int u0, u1, p0, p1;
  split_range(H, nt, tid, &u0, &u1);
  split_range(P, nt, tid, &p0, &p1);
  for (int l = 0; l < L; ++l) {
    const W* w_ih = (const W*)a.w_ih[l];
    const W* w_hh = (const W*)a.w_hh[l];
    const W* w_hr = (const W*)a.w_hr[l];
    const float* b_ih = (const float*)a.b_ih[l];
    const float* b_hh = (const float*)a.b_hh[l];
    const float* hp = h_cur + l * BP;
    float* hn = h_next + l * BP;
    const bool use_table = l == 0 && a.table != nullptr;
    const float* in = l == 0 ? x : h_next + (l - 1) * BP;
    const int I = l == 0 ? a.I : P;
    if (u1 > u0)
      for (int g = 0; g < G; ++g) {
        const int r0 = g * H + u0;
        if (!use_table)
          gemm_nt<float, W>(B, u1 - u0, I, in, I, w_ih + (long)r0 * I, I,
                            b_ih ? b_ih + r0 : nullptr, a.gi + r0, GH);
        gemm_nt<float, W>(B, u1 - u0, P, hp, P, w_hh + (long)r0 * P, P,
                          b_hh ? b_hh + r0 : nullptr, a.gh + r0, GH);
      }
    for (int b = 0; b < B; ++b) {
      const float* gx_row = use_table ? a.table + tokens[b] * GH : a.gi + (long)b * GH;
      const float* gh_row = a.gh + (long)b * GH;
      if (cell == kLSTM) {
        float* c_row = a.c + l * BH + (long)b * H;
        float* out = w_hr ? a.m + (long)b * H : hn + (long)b * P;
        lstm_row_forward<float>(u0, u1, H, gx_row, gh_row, c_row, c_row,
                                w_hr ? nullptr : hp + (long)b * P, out, nullptr, nullptr, true);
      } else if (cell == kGRU) {
        gru_row_forward<float>(u0, u1, H, gx_row, gh_row, hp + (long)b * P, hn + (long)b * P,
                               nullptr, nullptr, nullptr, true);
      } else {
        rnn_row_forward<float>(cell, u0, u1, gx_row, gh_row, hp + (long)b * P,
                               hn + (long)b * P, nullptr, true);
      }
    }
    if (w_hr) {
#pragma omp barrier
      if (p1 > p0) gemm_nt<float, W>(B, p1 - p0, H, a.m, H, w_hr + (long)p0 * H, H, nullptr,
                                     hn + p0, P);
    }
#pragma omp barrier
  }
  if (with_head && a.head_w) {
    int v0, v1;
    split_range(a.V, nt, tid, &v0, &v1);
    if (v1 > v0)
      gemm_nt<float, W>(B, v1 - v0, P, h_next + (L - 1) * BP, P, (const W*)a.head_w + (long)v0 * P,
                        P, a.head_b, a.logits + v0, a.V);
#pragma omp barrier
  }
}

// Threads for decoding: the matrices are streamed once per step; below ~256K weights per
// step one thread is faster than splitting them (barriers cost about a microsecond).
inline int decoder_threads(const DecoderArgs& a) {
  const long GH = (long)gate_count(a.cell) * a.H;
  const long per_step = (long)a.L * GH * (a.H + a.P) + (long)a.V * a.P;
  return per_step * a.B >= (1L << 18) ? omp_get_max_threads() : 1;
}

template <typename W>
void decoder_step_impl(const DecoderArgs& a, const int64_t* tokens, const float* x,
                       int with_head) {
#pragma omp parallel num_threads(decoder_threads(a))
  decoder_step_body<W>(a, tokens, x, a.h_cur, a.h_next, with_head != 0, omp_get_num_threads(),
                       omp_get_thread_num());
}

void decoder_step(const DecoderArgs& a, const int64_t* tokens, const float* x, int with_head) {
  if (a.wdtype == 1)
    decoder_step_impl<bf16>(a, tokens, x, with_head);
  else
    decoder_step_impl<float>(a, tokens, x, with_head);
}

template <typename W>
int64_t generate_impl(const DecoderArgs& a, GenerateArgs& g) {
  const int B = a.B, V = a.V, Pp = g.prime_len, steps = g.steps;
  const int64_t total = (int64_t)Pp + steps - 1;
  int error_row = -1;
#pragma omp parallel num_threads(decoder_threads(a))
  {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    int64_t* tokens = (int64_t*)__builtin_alloca(sizeof(int64_t) * B);  // per thread, once
    for (int64_t n = 0; n < total; ++n) {
      for (int b = 0; b < B; ++b)
        tokens[b] = n < Pp ? g.prime[(long)b * Pp + n] : g.out[(long)b * steps + (n - Pp)];
      // Ping-pong: even steps read the caller's h_cur, odd steps read h_next.
      const float* h_cur = (n & 1) ? a.h_next : a.h_cur;
      float* h_nxt = (n & 1) ? a.h_cur : a.h_next;
      const bool sample_now = n >= Pp - 1;
      decoder_step_body<W>(a, tokens, nullptr, h_cur, h_nxt, sample_now, nt, tid);
      if (sample_now) {
        const int64_t j = n - (Pp - 1);  // index of the token being sampled
        for (int b = tid; b < B; b += nt) {
          int64_t tok = sample_row(a.logits + (long)b * V, V, g.temperature, g.top_k, g.top_p,
                                   g.seed, (uint64_t)b, (uint64_t)j, g.weights + (long)b * V,
                                   g.order + (long)b * V);
          if (tok < 0) {
#pragma omp atomic write
            error_row = b;
            tok = 0;
          }
          g.out[(long)b * steps + j] = tok;
        }
#pragma omp barrier
      }
    }
  }
  g.error_row = error_row;
  return total;
}

int64_t generate(const DecoderArgs& a, GenerateArgs& g) {
  return a.wdtype == 1 ? generate_impl<bf16>(a, g) : generate_impl<float>(a, g);
}

void forward_f32(const ForwardArgs& a) { layer_forward<float>(a); }
void forward_f64(const ForwardArgs& a) { layer_forward<double>(a); }
void backward_f32(const BackwardArgs& a) { layer_backward<float>(a); }
void backward_f64(const BackwardArgs& a) { layer_backward<double>(a); }
