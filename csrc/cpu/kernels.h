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

#define RK_INLINE inline __attribute__((always_inline))

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
// Packed products. Every matrix product here is C[m, n] = sum_k A[m, k] * Wop[k, n] with a
// small M (the batch: 1-64 rows) and a weight operand Wop that is used for many products (every
// time step, every decoded token). Wop is therefore packed once into *column panels*: panel p
// holds NV vectors of L lanes for every k, k-major ([K][NV][L], zero-padded), and a tile of
// MR rows x NV vectors is computed as MR*NV register accumulators over k by broadcasting
// A[m, k] and loading the panel's NV vectors once for all MR rows (a BLIS-style outer-product
// microkernel). Compared with the dot-product tiling this replaced (3 weight rows x 4 batch rows,
// horizontal sums at the end), it needs no horizontal sums and reads each weight once per MR
// rows instead of once per 4. Measured on a 2-core AVX-512 x86-64 (1 thread), one LSTM layer
// H=512, B=32, T=256 forward without saved activations: 288 ms -> 81 ms (60 -> 212 GFLOP/s;
// this change together with the vectorised cell update below); torch's MKL GEMM reaches about
// 95 GFLOP/s on this CPU, oneDNN's LSTM about 210.
//
// Panels can be *gated*: with G gates of Nu units each (weight row n = g * Nu + unit), vector v
// of panel p holds gate v % G of units p*UG*L + (v / G)*L + [0, L) (UG = NV / G unit groups), so
// one tile holds every gate of its units and the cell update runs on it while it is in L1.
// With G = 1 a panel is simply NV*L consecutive columns.
//
// Registers: MR*NV accumulators + NV weight vectors + 1 broadcast; AVX-512 has 32 vector
// registers (MR = 6 for NV = 4, 8 for NV = 3), AVX2 and SSE 16 (MR = 2 and 4).

constexpr int kVecRegs = RK_VEC_BYTES == 64 ? 32 : 16;

template <int NV>
constexpr int tile_rows() {
  constexpr int r = (kVecRegs - 1 - NV) / NV;
  return r > 8 ? 8 : (r < 1 ? 1 : r);
}

template <typename W>
inline void* alloc_packed(long elems) {
  // 64-byte aligned (a cache line; aligned_alloc needs a multiple of the alignment).
  long bytes = (elems * (long)sizeof(W) + 63) / 64 * 64;
  return bytes ? aligned_alloc(64, bytes) : nullptr;
}

// Geometry of a packed operand: N = G * Nu columns, K rows.
struct PanelShape {
  int G, Nu, K, NV, L;
  int units_per_panel() const { return NV / G * L; }
  int panels() const { return (Nu + units_per_panel() - 1) / units_per_panel(); }
  long panel_elems() const { return (long)K * NV * L; }
};

// Where element (v, l) of a panel's row k sits within that row. float32/64: vector after
// vector. bfloat16: vectors in pairs, lane l of vectors 2j and 2j+1 side by side in one 32-bit
// word, so that one full-width load gives both as float32 with a shift and a mask
// (load_panel_row); an odd last vector is stored plainly. GCC turned the plain layout's
// widening conversion into 6 shuffle instructions per vector, and the bf16 decoder ran at
// 49 GB/s against 63 for float32.
template <typename W>
constexpr long panel_offset(int v, int l, int L, int NV) {
  if constexpr (sizeof(W) == 2) {
    if (v < NV / 2 * 2) return (long)(v / 2) * 2 * L + 2 * l + (v & 1);
  }
  return (long)v * L + l;
}

template <int NV, typename VT, typename W>
RK_INLINE void load_panel_row(const W* pk, VT* w) {
  constexpr int L = sizeof(VT) / (sizeof(W) == 2 ? 4 : sizeof(W));  // lanes of VT
  if constexpr (sizeof(W) == 2) {
#pragma GCC unroll 8
    for (int j = 0; j < NV / 2; ++j) {
      vuint32 u;
      __builtin_memcpy(&u, pk + 2 * j * L, sizeof u);
      w[2 * j] = (VT)(u << 16);
      w[2 * j + 1] = (VT)(u & 0xFFFF0000u);
    }
    if (NV & 1) w[NV - 1] = load_vec<VT>(pk + (NV - 1) * L);
  } else {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) w[v] = load_vec<VT>(pk + v * L);
  }
}

// Pack panel p of Wop. `n_major`: Wop[k, n] = W[n * ld + k] (a weight [N, K] used as its
// transpose, as h @ W_hhᵀ); otherwise Wop[k, n] = W[k * ld + n] (dh @ W_hh).
//
// Each case walks its source contiguously: n_major column by column (a row of W is a column
// of the panel), the other row by row (a row of W holds the panel row's L-unit runs). Column
// by column for both, the row-major case (the backward's W_hh and W_hr) read every element
// from a new cache line: GRU 1x512, B=1, T=1 forward + backward spent 20% of its time packing
// (perf), and row by row GRU 1x1024 B=1 T=1 forward + backward takes 20-22 ms instead of
// 38-44 (3 interleaved runs, 1 thread; LSTM 1x512 B=16 T=64 1-3% less). Tiling the n_major
// case as well (16 panel rows at a time) made the forward 1.5-2x slower.
// Columns of a panel row: at most 4 vectors (panel_vectors, the 4-vector panels) of at most
// one full-width float32 vector's lanes.
constexpr int kMaxPanelColumns = 4 * (RK_VEC_BYTES / 4);

template <typename W>
void pack_panel(const PanelShape& s, int p, const W* src, long ld, bool n_major, W* dst) {
  const int UG = s.NV / s.G, L = s.L, n = s.NV * L;
  const long row = n;
  // Per column c = v * L + l of the panel: its column of Wop (-1 past Nu: zero padding) and
  // its place in a panel row; computed once, not per element.
  long col[kMaxPanelColumns], at[kMaxPanelColumns];
  for (int v = 0; v < s.NV; ++v)
    for (int l = 0; l < L; ++l) {
      const int unit = p * UG * L + (v / s.G) * L + l;
      col[v * L + l] = unit < s.Nu ? (long)(v % s.G) * s.Nu + unit : -1;
      at[v * L + l] = panel_offset<W>(v, l, L, s.NV);
    }
  if (n_major) {
    for (int c = 0; c < n; ++c) {
      W* d = dst + at[c];
      if (col[c] < 0) {
        for (int k = 0; k < s.K; ++k) d[k * row] = W{};
      } else {
        const W* w = src + col[c] * ld;
        for (int k = 0; k < s.K; ++k) d[k * row] = w[k];
      }
    }
    return;
  }
  for (int k = 0; k < s.K; ++k) {
    const W* w = src + (long)k * ld;
    W* d = dst + k * row;
    for (int c = 0; c < n; ++c) d[at[c]] = col[c] < 0 ? W{} : w[col[c]];
  }
}

// acc[r][v] = sum_k A[r, k] * panel[k][v] for r < MR. With fewer than 8 accumulators (decoding
// one or two streams) two interleaved sets keep 8 FMA chains in flight, enough to cover the FMA
// latency (4 cycles, 2 pipes), so the matrix-vector product runs at the rate memory delivers.
template <int MR, int NV, typename S, typename W>
inline void panel_tile(int K, const S* A, long lda, const W* panel,
                       typename Vec<S>::type (*acc)[NV]) {
  typedef typename Vec<S>::type VT;
  constexpr int L = Vec<S>::lanes;
  constexpr int KS = MR * NV < 8 ? 2 : 1;
  VT a[KS][MR][NV];
#pragma GCC unroll 64
  for (int s = 0; s < KS; ++s)
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) a[s][r][v] = VT{};
  int k = 0;
  for (; k + KS <= K; k += KS) {
#pragma GCC unroll 4
    for (int s = 0; s < KS; ++s) {
      const W* pk = panel + (long)(k + s) * NV * L;
      VT w[NV];
      load_panel_row<NV>(pk, w);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const S x = A[r * lda + k + s];
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) a[s][r][v] += w[v] * x;
      }
    }
  }
  for (; k < K; ++k) {
    VT w[NV];
    load_panel_row<NV>(panel + (long)k * NV * L, w);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const S x = A[r * lda + k];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) a[0][r][v] += w[v] * x;
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      VT t = a[0][r][v];
      if (KS > 1) t += a[KS - 1][r][v];
      acc[r][v] = t;
    }
}

// Dispatch a tail of mr < MR rows to the tile of that height (mr is known only at run time).
template <int MR, int NV, typename S, typename W>
inline void panel_tile_rows(int mr, int K, const S* A, long lda, const W* panel,
                            typename Vec<S>::type (*acc)[NV]) {
  if constexpr (MR > 1) {
    if (mr < MR) return panel_tile_rows<MR - 1, NV, S, W>(mr, K, A, lda, panel, acc);
  }
  panel_tile<MR, NV, S, W>(K, A, lda, panel, acc);
}

// All M rows of one panel: tiles of MR rows, `epilogue(m0, mr, acc)` on each.
template <int NV, typename S, typename W, typename Epilogue>
inline void panel_rows(int M, int K, const S* A, long lda, const W* panel, Epilogue&& epilogue) {
  typedef typename Vec<S>::type VT;
  constexpr int MR = tile_rows<NV>();
  VT acc[MR][NV];
  int m = 0;
  for (; m + MR <= M; m += MR) {
    panel_tile<MR, NV, S, W>(K, A + (long)m * lda, lda, panel, acc);
    epilogue(m, MR, acc);
  }
  if (m < M) {
    panel_tile_rows<MR, NV, S, W>(M - m, K, A + (long)m * lda, lda, panel, acc);
    epilogue(m, M - m, acc);
  }
}

// Epilogue helper: C[m0 + r, g * Nu + unit] = acc + bias for the panel's valid columns.
template <int NV, typename S>
inline void store_tile(const PanelShape& s, int p, int m0, int mr,
                       const typename Vec<S>::type (*acc)[NV], const S* bias, S* C, long ldc) {
  typedef typename Vec<S>::type VT;
  constexpr int L = Vec<S>::lanes;
  const int UG = NV / s.G;
  for (int v = 0; v < NV; ++v) {
    const int unit0 = p * UG * L + (v / s.G) * L;
    const long col = (long)(v % s.G) * s.Nu + unit0;
    const int n = s.Nu - unit0 < L ? s.Nu - unit0 : L;
    if (n <= 0) continue;
    VT b = VT{};
    if (bias) {
      if (n == L)
        b = load_vec<VT>(bias + col);
      else
        for (int l = 0; l < n; ++l) b[l] = bias[col + l];
    }
    for (int r = 0; r < mr; ++r) {
      VT t = acc[r][v] + b;
      S* c = C + (long)(m0 + r) * ldc + col;
      if (n == L)
        __builtin_memcpy(c, &t, sizeof t);
      else
        for (int l = 0; l < n; ++l) c[l] = t[l];
    }
  }
}

// A packed operand owned by one call (training) or one decoder plan.
template <typename W>
struct Packed {
  PanelShape shape;
  W* data;
  const W* panel(int p) const { return data + (long)p * shape.panel_elems(); }
};

template <typename W>
inline Packed<W> packed_alloc(int G, int Nu, int K, int NV, int L) {
  Packed<W> out{{G, Nu, K, NV, L}, nullptr};
  out.data = (W*)alloc_packed<W>((long)out.shape.panels() * out.shape.panel_elems());
  return out;
}

// Panels [lo, hi) of n for thread tid of nt (contiguous ranges).
inline void split_count(int n, int nt, int tid, int* lo, int* hi) {
  int per = n / nt, extra = n % nt;
  *lo = tid * per + (tid < extra ? tid : extra);
  *hi = *lo + per + (tid < extra ? 1 : 0);
}

// ---------------------------------------------------------------------------------------------
// Activations. float32: Cephes-style polynomials (max error about 2 ulp on the ranges used),
// written once for scalars and for vectors (GCC vector extensions; per-lane choices are
// selects, not branches). The cell updates below run on whole vectors of units with a scalar
// tail: GCC did not vectorise the former `omp simd` loops ("control flow in loop"), and the
// scalar LSTM update cost about as much as the recurrent product itself (perf: 29% of a
// forward, vs 18% for the product). float64: libm, scalar.
//
// (RK_INLINE: called out of line, as GCC chose for the many calls per unit, the activations
// cannot be vectorised either.)

typedef int32_t vint32 __attribute__((vector_size(RK_VEC_BYTES)));

template <typename V>
RK_INLINE V splat(float s) {
  return V{} + s;
}
template <>
RK_INLINE float splat<float>(float s) {
  return s;
}

// Reinterpretation between float and int32 of the same shape.
RK_INLINE int32_t as_int(float x) { return __builtin_bit_cast(int32_t, x); }
RK_INLINE float as_float(int32_t x) { return __builtin_bit_cast(float, x); }
RK_INLINE vint32 as_int(vfloat x) { return (vint32)x; }
RK_INLINE vfloat as_float(vint32 x) { return (vfloat)x; }

template <typename V>
RK_INLINE V exp_approx(V x) {
  // Clamp so that the power of two below stays a normal float (NaN passes through).
  x = x < splat<V>(-87.0f) ? splat<V>(-87.0f) : x;
  x = x > splat<V>(88.0f) ? splat<V>(88.0f) : x;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (exact for |n| < 2^22).
  const V shift = splat<V>(12582912.0f);
  V t = x * 1.44269504088896341f + shift;
  V n = t - shift;
  auto ni = as_int(t) - as_int(shift);
  // r = x - n ln 2 in two pieces (Cody-Waite), |r| <= ln2 / 2.
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = splat<V>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  V scale = as_float((ni + 127) << 23);
  return p * scale;
}

template <typename V>
RK_INLINE V sigmoid_act(V x) {
  return 1.0f / (1.0f + exp_approx(-x));
}

template <typename V>
RK_INLINE V tanh_act(V x) {
  const V zero = splat<V>(0.0f);
  V ax = x < zero ? -x : x;
  // |x| < 0.625: odd polynomial (Cephes tanhf); else 1 - 2 / (exp(2|x|) + 1) with the sign.
  V s = x * x;
  V p = splat<V>(-5.70498872745e-3f);
  p = p * s + 2.06390887954e-2f;
  p = p * s - 5.37397155531e-2f;
  p = p * s + 1.33314422036e-1f;
  p = p * s - 3.33332819422e-1f;
  V small = p * s * x + x;
  V big = 1.0f - 2.0f / (exp_approx(2.0f * ax) + 1.0f);
  big = x < zero ? -big : big;
  return ax < splat<V>(0.625f) ? small : big;
}

template <>
RK_INLINE double sigmoid_act<double>(double x) {
  return 1.0 / (1.0 + __builtin_exp(-x));
}
template <>
RK_INLINE double tanh_act<double>(double x) {
  return __builtin_tanh(x);
}

template <typename V>
RK_INLINE V relu_act(V x) {
  return x < V{} ? V{} : x;  // NaN stays NaN, as torch.relu
}

// Loads and stores of one unit (V = S) or one vector of units (V = Vec<S>::type).
template <typename V, typename S>
struct Io {
  static RK_INLINE V load(const S* p) { return *p; }
  static RK_INLINE void store(S* p, V v) { *p = v; }
};
template <typename S>
struct VecIo {
  typedef typename Vec<S>::type VT;
  static RK_INLINE VT load(const S* p) { return load_vec<VT>(p); }
  static RK_INLINE void store(S* p, VT v) { __builtin_memcpy(p, &v, sizeof v); }
};
template <>
struct Io<vfloat, float> : VecIo<float> {};

// Run `body(V{}, u)` on units [u0, u1): whole float32 vectors (V = vfloat), then scalars
// (V = S); the body reads its value type from the first argument. float64 runs scalar (its
// activations are libm calls).
template <typename S, typename Body>
RK_INLINE void for_units(int u0, int u1, Body&& body) {
  int u = u0;
  if constexpr (sizeof(S) == 4) {
    constexpr int L = Vec<float>::lanes;
    for (; u + L <= u1; u += L) body(vfloat{}, u);
  }
  for (; u < u1; ++u) body(S{}, u);
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
  for_units<S>(u0, u1, [&](auto tag, int u) {
    typedef decltype(tag) V;
    typedef Io<V, S> io;
    V i = sigmoid_act(io::load(gx + u) + io::load(gh + u));
    V f = sigmoid_act(io::load(gx + H + u) + io::load(gh + H + u));
    V g = tanh_act(io::load(gx + 2 * H + u) + io::load(gh + 2 * H + u));
    V o = sigmoid_act(io::load(gx + 3 * H + u) + io::load(gh + 3 * H + u));
    V cp = io::load(c_prev + u);
    V c = f * cp + i * g;
    V h = o * tanh_act(c);
    if (gates) {
      io::store(gates + u, i);
      io::store(gates + H + u, f);
      io::store(gates + 2 * H + u, g);
      io::store(gates + 3 * H + u, o);
    }
    io::store(c_new + u, active ? c : cp);
    if (h_prev) {
      io::store(out + u, active ? h : io::load(h_prev + u));
      if (y) io::store(y + u, active ? h : V{});
    } else {
      io::store(out + u, h);
    }
  });
}

template <typename S>
inline void gru_row_forward(int u0, int u1, int H, const S* gx, const S* gh, const S* h_prev,
                            S* h_next, S* y, S* gates, S* hn, bool active) {
  for_units<S>(u0, u1, [&](auto tag, int u) {
    typedef decltype(tag) V;
    typedef Io<V, S> io;
    V r = sigmoid_act(io::load(gx + u) + io::load(gh + u));
    V z = sigmoid_act(io::load(gx + H + u) + io::load(gh + H + u));
    V ghn = io::load(gh + 2 * H + u);
    V n = tanh_act(io::load(gx + 2 * H + u) + r * ghn);
    V hp = io::load(h_prev + u);
    V h = (S(1) - z) * n + z * hp;
    if (gates) {
      io::store(gates + u, r);
      io::store(gates + H + u, z);
      io::store(gates + 2 * H + u, n);
    }
    if (hn) io::store(hn + u, ghn);
    io::store(h_next + u, active ? h : hp);
    if (y) io::store(y + u, active ? h : V{});
  });
}

template <typename S>
inline void rnn_row_forward(int cell, int u0, int u1, const S* gx, const S* gh, const S* h_prev,
                            S* h_next, S* y, bool active) {
  for_units<S>(u0, u1, [&](auto tag, int u) {
    typedef decltype(tag) V;
    typedef Io<V, S> io;
    V pre = io::load(gx + u) + io::load(gh + u);
    V h = cell == kRNNTanh ? tanh_act(pre) : relu_act(pre);
    io::store(h_next + u, active ? h : io::load(h_prev + u));
    if (y) io::store(y + u, active ? h : V{});
  });
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


// Vectors per panel for a cell's gated recurrent product: every gate of L units (LSTM 4,
// GRU 3), or 4 vectors of L units for the one-gate RNN and the ungated products.
template <int G>
constexpr int panel_vectors() {
  return G == 3 ? 3 : 4;
}

// ---------------------------------------------------------------------------------------------
// Training forward: all T steps of one layer, one parallel region, one barrier per step
// (two with a projection). W_hh is packed into gated panels once per call; each thread owns a
// range of panels (hence of hidden units, all their gates) and packs them itself. For each
// tile of MR batch rows the recurrent product, b_hh and the cell update run back to back, so
// gh is written and read while in L1.

template <typename S, int G>
void layer_forward_cell(const ForwardArgs& a) {
  typedef typename Vec<S>::type VT;
  constexpr int NV = panel_vectors<G>();
  constexpr int L = Vec<S>::lanes;
  const int T = a.T, B = a.B, H = a.H, P = a.P, cell = a.cell;
  const int GH = G * H;
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
  Packed<S> pw = packed_alloc<S>(G, H, P, NV, L);
  Packed<S> pr = proj ? packed_alloc<S>(1, P, H, 4, L) : Packed<S>{{1, 0, 0, 4, L}, nullptr};
  const int upp = pw.shape.units_per_panel();

#pragma omp parallel num_threads(nth)
  {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    int q0, q1, r0, r1, u0, u1, p0, p1;
    split_count(pw.shape.panels(), nt, tid, &q0, &q1);
    split_count(pr.shape.panels(), nt, tid, &r0, &r1);
    split_range(H, nt, tid, &u0, &u1);
    split_range(P, nt, tid, &p0, &p1);
    for (int q = q0; q < q1; ++q) pack_panel<S>(pw.shape, q, w_hh, P, true, pw.data + q * pw.shape.panel_elems());
    for (int q = r0; q < r1; ++q) pack_panel<S>(pr.shape, q, w_hr, H, true, pr.data + q * pr.shape.panel_elems());
    for (int b = 0; b < B; ++b) {
      for (int p = p0; p < p1; ++p) hs[b * P + p] = ((const S*)a.h0)[b * P + p];
      if (lstm)
        for (int u = u0; u < u1; ++u) aux[b * H + u] = ((const S*)a.c0)[b * H + u];
    }
#pragma omp barrier
    for (int s = 0; s < T; ++s) {
      const S* h_prev = hs + slot(s) * BP;
      S* h_next = hs + slot(s + 1) * BP;
      for (int q = q0; q < q1; ++q) {
        const int ua = q * upp, ub = ua + upp < H ? ua + upp : H;
        panel_rows<NV, S, S>(B, P, h_prev, P, pw.panel(q), [&](int m0, int mr, VT(*acc)[NV]) {
          store_tile<NV, S>(pw.shape, q, m0, mr, acc, b_hh, gh, GH);
          for (int b = m0; b < m0 + mr; ++b) {
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
                lstm_row_forward<S>(ua, ub, H, gx_row, gh_row, c_prev, c_new, nullptr,
                                    mbuf + (long)b * H, nullptr, g_row, active);
              else
                lstm_row_forward<S>(ua, ub, H, gx_row, gh_row, c_prev, c_new, h_prev + b * P,
                                    h_next + b * P, y_row, g_row, active);
            } else if (cell == kGRU) {
              S* g_row = a.save ? gates + ((long)s * B + b) * GH : nullptr;
              S* hn_row = a.save ? aux + ((long)s * B + b) * H : nullptr;
              gru_row_forward<S>(ua, ub, H, gx_row, gh_row, h_prev + b * P, h_next + b * P,
                                 y_row, g_row, hn_row, active);
            } else {
              rnn_row_forward<S>(cell, ua, ub, gx_row, gh_row, h_prev + b * P, h_next + b * P,
                                 y_row, active);
            }
          }
        });
      }
      if (proj) {
#pragma omp barrier
        const int ppp = pr.shape.units_per_panel();
        for (int q = r0; q < r1; ++q) {
          const int pa = q * ppp, pb = pa + ppp < P ? pa + ppp : P;
          panel_rows<4, S, S>(B, H, mbuf, H, pr.panel(q), [&](int m0, int mr, VT(*acc)[4]) {
            store_tile<4, S>(pr.shape, q, m0, mr, acc, nullptr, h_next, P);
            for (int b = m0; b < m0 + mr; ++b) {
              const bool active = !a.lengths || s < a.lengths[b];
              S* y_row = y + (time_index(s, T, a.lengths, b, a.reverse) * B + b) * P;
              for (int p = pa; p < pb; ++p) {
                if (!active) h_next[b * P + p] = h_prev[b * P + p];
                y_row[p] = active ? h_next[b * P + p] : S(0);
              }
            }
          });
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
  free(pw.data);
  free(pr.data);
}

template <typename S>
void layer_forward(const ForwardArgs& a) {
  if (a.cell == kLSTM)
    layer_forward_cell<S, 4>(a);
  else if (a.cell == kGRU)
    layer_forward_cell<S, 3>(a);
  else
    layer_forward_cell<S, 1>(a);
}
// ---------------------------------------------------------------------------------------------
// Training backward: the sequential part of BPTT (dgx, dh0, dc0, and the per-step inputs of
// the weight-gradient GEMMs), two barriers per step (three with a projection).
template <typename S>
inline void lstm_row_backward(int u0, int u1, int H, const S* gates, const S* c_prev,
                              const S* c_new, const S* dm, S* dc, S* dpre, S* dgx, bool active) {
  for_units<S>(u0, u1, [&](auto tag, int u) {
    typedef decltype(tag) V;
    typedef Io<V, S> io;
    V i = io::load(gates + u), f = io::load(gates + H + u);
    V g = io::load(gates + 2 * H + u), o = io::load(gates + 3 * H + u);
    V tc = tanh_act(io::load(c_new + u));
    V d = io::load(dm + u);
    V d_o = d * tc;
    V dct = io::load(dc + u) + d * o * (S(1) - tc * tc);
    V di = dct * g, dg = dct * i, df = dct * io::load(c_prev + u);
    V pi = di * i * (S(1) - i), pf = df * f * (S(1) - f);
    V pg = dg * (S(1) - g * g), po = d_o * o * (S(1) - o);
    if (!active) pi = pf = pg = po = V{};
    io::store(dpre + u, pi);
    io::store(dpre + H + u, pf);
    io::store(dpre + 2 * H + u, pg);
    io::store(dpre + 3 * H + u, po);
    io::store(dgx + u, pi);
    io::store(dgx + H + u, pf);
    io::store(dgx + 2 * H + u, pg);
    io::store(dgx + 3 * H + u, po);
    if (active) io::store(dc + u, dct * f);
  });
}

template <typename S>
inline void gru_row_backward(int u0, int u1, int H, const S* gates, const S* hn, const S* h_prev,
                             const S* dht, S* dpre, S* dgx, S* dgh, bool active) {
  for_units<S>(u0, u1, [&](auto tag, int u) {
    typedef decltype(tag) V;
    typedef Io<V, S> io;
    V r = io::load(gates + u), z = io::load(gates + H + u), n = io::load(gates + 2 * H + u);
    V d = io::load(dht + u);
    V dn = d * (S(1) - z);
    V dz = d * (io::load(h_prev + u) - n);
    V pn = dn * (S(1) - n * n);
    V pr = pn * io::load(hn + u) * r * (S(1) - r);
    V pz = dz * z * (S(1) - z);
    if (!active) pr = pz = pn = V{};
    io::store(dgx + u, pr);
    io::store(dgx + H + u, pz);
    io::store(dgx + 2 * H + u, pn);
    io::store(dpre + u, pr);
    io::store(dpre + H + u, pz);
    io::store(dpre + 2 * H + u, pn * r);
    io::store(dgh + u, pr);
    io::store(dgh + H + u, pz);
    io::store(dgh + 2 * H + u, pn * r);
  });
}

template <typename S>
inline void rnn_row_backward(int cell, int u0, int u1, const S* h_new, const S* dht, S* dpre,
                             S* dgx, bool active) {
  for_units<S>(u0, u1, [&](auto tag, int u) {
    typedef decltype(tag) V;
    typedef Io<V, S> io;
    V h = io::load(h_new + u);
    V deriv = cell == kRNNTanh ? S(1) - h * h : (h > V{} ? V{} + S(1) : V{});
    V p = active ? io::load(dht + u) * deriv : V{};
    io::store(dpre + u, p);
    io::store(dgx + u, p);
  });
}

template <typename S>
void layer_backward(const BackwardArgs& a) {
  typedef typename Vec<S>::type VT;
  constexpr int L = Vec<S>::lanes;
  const int T = a.T, B = a.B, H = a.H, P = a.P, cell = a.cell;
  const int G = gate_count(cell), GH = G * H;
  const S* hs = (const S*)a.hs;
  const S* aux = (const S*)a.aux;
  const S* gates = (const S*)a.gates;
  const S* w_hh = (const S*)a.w_hh;
  const S* w_hr = (const S*)a.w_hr;
  const S* dy = (const S*)a.dy;
  S* dgx = (S*)a.dgx;
  S* dgh = (S*)a.dgh;
  S* dh_proj = (S*)a.dh_proj;
  S* ring = (S*)a.dh_ring;
  S* dht = (S*)a.dh_total;
  S* dpre = (S*)a.dpre;
  S* dm = (S*)a.dm;
  S* dc = (S*)a.dc0;  // the running dc lives in the dc0 output
  const bool lstm = cell == kLSTM, proj = w_hr != nullptr;
  const long BP = (long)B * P, BH = (long)B * H;
  const int nth = threads_for(B, GH, P);
  // dh_prev = dpre @ W_hh: W_hh [G*H, P] is the k-major operand, panels over the P columns.
  Packed<S> pw = packed_alloc<S>(1, P, GH, 4, L);
  // dm = dh_total @ W_hr: W_hr [P, H] k-major, panels over the H columns.
  Packed<S> pr = proj ? packed_alloc<S>(1, H, P, 4, L) : Packed<S>{{1, 0, 0, 4, L}, nullptr};

#pragma omp parallel num_threads(nth)
  {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    int u0, u1, p0, p1, q0, q1, r0, r1;
    split_range(P, nt, tid, &p0, &p1);
    split_count(pw.shape.panels(), nt, tid, &q0, &q1);
    // Hidden units in whole panels of 4 vectors, the same split as W_hr's panels, so that with
    // a projection each thread computes dm for exactly the units its pointwise update reads.
    split_count((H + 4 * L - 1) / (4 * L), nt, tid, &r0, &r1);
    u0 = r0 * 4 * L < H ? r0 * 4 * L : H;
    u1 = r1 * 4 * L < H ? r1 * 4 * L : H;
    if (!proj) r1 = r0;
    for (int q = q0; q < q1; ++q) pack_panel<S>(pw.shape, q, w_hh, P, false, pw.data + q * pw.shape.panel_elems());
    for (int q = r0; q < r1; ++q) pack_panel<S>(pr.shape, q, w_hr, H, false, pr.data + q * pr.shape.panel_elems());
    const int ppp = pw.shape.units_per_panel();
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
        for (int q = r0; q < r1; ++q)
          panel_rows<4, S, S>(B, P, dht, P, pr.panel(q), [&](int m0, int mr, VT(*acc)[4]) {
            store_tile<4, S>(pr.shape, q, m0, mr, acc, nullptr, dm, H);
          });
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
      for (int q = q0; q < q1; ++q) {
        const int pa = q * ppp, pb = pa + ppp < P ? pa + ppp : P;
        panel_rows<4, S, S>(B, GH, dpre, GH, pw.panel(q), [&](int m0, int mr, VT(*acc)[4]) {
          store_tile<4, S>(pw.shape, q, m0, mr, acc, nullptr, dh_next, P);
          for (int b = m0; b < m0 + mr; ++b) {
            const bool active = !a.lengths || s < a.lengths[b];
            const S* z_row = cell == kGRU ? gates + ((long)s * B + b) * GH + H : nullptr;
            for (int p = pa; p < pb; ++p) {
              S v = dh_next[b * P + p];
              if (z_row) v += dht[b * P + p] * z_row[p];
              dh_next[b * P + p] = active ? v : dh_cur[b * P + p];
            }
          }
        });
      }
#pragma omp barrier
    }
    const S* dh_last = ring + (T & 1) * BP;
    for (int b = 0; b < B; ++b)
      for (int p = p0; p < p1; ++p) ((S*)a.dh0)[b * P + p] = dh_last[b * P + p];
  }
  free(pw.data);
  free(pr.data);
}

// ---------------------------------------------------------------------------------------------
// Decoder: one step of L stacked layers (+ head) for B streams, inside a parallel region.
// Layer l reads its own state from h_cur[l] and its input from h_next[l - 1] (written this
// step), writes h_next[l]; c is updated in place (each unit by the thread that owns it).
//
// The plan's matrices are packed into panels once (decoder_pack), in the plan's weight dtype:
// gated panels for W_ih and W_hh (every gate of a unit group in one panel, so a tile of the two
// products is followed at once by the cell update of those units), 4-vector panels for W_hr
// and the head. A step streams each packed byte exactly once.

struct DecoderPack {
  int L;
  PanelShape* shapes;  // [L][3] (ih, hh, hr) then the head
  void** data;         // same layout; null where a layer has no such matrix
};

template <typename W, int G>
void decoder_pack_cell(const DecoderArgs& a, DecoderPack* pk) {
  constexpr int NV = panel_vectors<G>();
  constexpr int L = Vec<float>::lanes;
  auto pack = [&](int slot, int g, int nu, int K, const W* src, long ld) {
    Packed<W> p = packed_alloc<W>(g, nu, K, g == 1 ? 4 : NV, L);
    for (int q = 0; q < p.shape.panels(); ++q)
      pack_panel<W>(p.shape, q, src, ld, true, p.data + q * p.shape.panel_elems());
    pk->shapes[slot] = p.shape;
    pk->data[slot] = p.data;
  };
  for (int l = 0; l < a.L; ++l) {
    const int I = l == 0 ? a.I : a.P;
    if (a.w_ih[l]) pack(3 * l, G, a.H, I, (const W*)a.w_ih[l], I);
    pack(3 * l + 1, G, a.H, a.P, (const W*)a.w_hh[l], a.P);
    if (a.w_hr[l]) pack(3 * l + 2, 1, a.P, a.H, (const W*)a.w_hr[l], a.H);
  }
  if (a.head_w) pack(3 * a.L, 1, a.V, a.P, (const W*)a.head_w, a.P);
}

void* decoder_pack(const DecoderArgs& a) {
  DecoderPack* pk = (DecoderPack*)calloc(1, sizeof(DecoderPack));
  pk->L = a.L;
  pk->shapes = (PanelShape*)calloc(3 * a.L + 1, sizeof(PanelShape));
  pk->data = (void**)calloc(3 * a.L + 1, sizeof(void*));
  const int G = gate_count(a.cell);
  if (a.wdtype == 1) {
    if (G == 4) decoder_pack_cell<bf16, 4>(a, pk);
    else if (G == 3) decoder_pack_cell<bf16, 3>(a, pk);
    else decoder_pack_cell<bf16, 1>(a, pk);
  } else {
    if (G == 4) decoder_pack_cell<float, 4>(a, pk);
    else if (G == 3) decoder_pack_cell<float, 3>(a, pk);
    else decoder_pack_cell<float, 1>(a, pk);
  }
  return pk;
}

void decoder_free(void* handle) {
  DecoderPack* pk = (DecoderPack*)handle;
  if (!pk) return;
  for (int i = 0; i < 3 * pk->L + 1; ++i) free(pk->data[i]);
  free(pk->data);
  free(pk->shapes);
  free(pk);
}

template <typename W, int G>
inline void decoder_step_body(const DecoderArgs& a, const DecoderPack& pk, const int64_t* tokens,
                              const float* x, const float* h_cur, float* h_next, bool with_head,
                              int nt, int tid) {
  typedef typename Vec<float>::type VT;
  constexpr int NV = panel_vectors<G>();
  const int L = a.L, B = a.B, H = a.H, P = a.P, cell = a.cell;
  const int GH = G * H;
  const long BP = (long)B * P, BH = (long)B * H;
  for (int l = 0; l < L; ++l) {
    const PanelShape& shh = pk.shapes[3 * l + 1];
    const W* p_ih = (const W*)pk.data[3 * l];
    const W* p_hh = (const W*)pk.data[3 * l + 1];
    const W* p_hr = (const W*)pk.data[3 * l + 2];
    const float* b_ih = (const float*)a.b_ih[l];
    const float* b_hh = (const float*)a.b_hh[l];
    const float* hp = h_cur + l * BP;
    float* hn = h_next + l * BP;
    const bool use_table = l == 0 && a.table != nullptr;
    const float* in = l == 0 ? x : h_next + (l - 1) * BP;
    const int I = l == 0 ? a.I : P;
    const int upp = shh.units_per_panel();
    int q0, q1;
    split_count(shh.panels(), nt, tid, &q0, &q1);
    for (int q = q0; q < q1; ++q) {
      const int ua = q * upp, ub = ua + upp < H ? ua + upp : H;
      if (!use_table)
        panel_rows<NV, float, W>(B, I, in, I, p_ih + q * pk.shapes[3 * l].panel_elems(),
                                 [&](int m0, int mr, VT(*acc)[NV]) {
                                   store_tile<NV, float>(shh, q, m0, mr, acc, b_ih, a.gi, GH);
                                 });
      panel_rows<NV, float, W>(B, P, hp, P, p_hh + q * shh.panel_elems(),
                               [&](int m0, int mr, VT(*acc)[NV]) {
        store_tile<NV, float>(shh, q, m0, mr, acc, b_hh, a.gh, GH);
        for (int b = m0; b < m0 + mr; ++b) {
          const float* gx_row = use_table ? a.table + tokens[b] * GH : a.gi + (long)b * GH;
          const float* gh_row = a.gh + (long)b * GH;
          if (cell == kLSTM) {
            float* c_row = a.c + l * BH + (long)b * H;
            float* out = p_hr ? a.m + (long)b * H : hn + (long)b * P;
            lstm_row_forward<float>(ua, ub, H, gx_row, gh_row, c_row, c_row,
                                    p_hr ? nullptr : hp + (long)b * P, out, nullptr, nullptr,
                                    true);
          } else if (cell == kGRU) {
            gru_row_forward<float>(ua, ub, H, gx_row, gh_row, hp + (long)b * P,
                                   hn + (long)b * P, nullptr, nullptr, nullptr, true);
          } else {
            rnn_row_forward<float>(cell, ua, ub, gx_row, gh_row, hp + (long)b * P,
                                   hn + (long)b * P, nullptr, true);
          }
        }
      });
    }
    if (p_hr) {
#pragma omp barrier
      const PanelShape& shr = pk.shapes[3 * l + 2];
      split_count(shr.panels(), nt, tid, &q0, &q1);
      for (int q = q0; q < q1; ++q)
        panel_rows<4, float, W>(B, H, a.m, H, p_hr + q * shr.panel_elems(),
                                [&](int m0, int mr, VT(*acc)[4]) {
                                  store_tile<4, float>(shr, q, m0, mr, acc, nullptr, hn, P);
                                });
    }
#pragma omp barrier
  }
  if (with_head && a.head_w) {
    const PanelShape& sv = pk.shapes[3 * L];
    const W* p_v = (const W*)pk.data[3 * L];
    int q0, q1;
    split_count(sv.panels(), nt, tid, &q0, &q1);
    for (int q = q0; q < q1; ++q)
      panel_rows<4, float, W>(B, P, h_next + (L - 1) * BP, P, p_v + q * sv.panel_elems(),
                              [&](int m0, int mr, VT(*acc)[4]) {
                                store_tile<4, float>(sv, q, m0, mr, acc, a.head_b, a.logits, a.V);
                              });
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

template <typename W, int G>
void decoder_step_impl(const DecoderArgs& a, const DecoderPack& pk, const int64_t* tokens,
                       const float* x, int with_head) {
#pragma omp parallel num_threads(decoder_threads(a))
  decoder_step_body<W, G>(a, pk, tokens, x, a.h_cur, a.h_next, with_head != 0,
                          omp_get_num_threads(), omp_get_thread_num());
}

void decoder_step(const DecoderArgs& a, const void* handle, const int64_t* tokens,
                  const float* x, int with_head) {
  const DecoderPack& pk = *(const DecoderPack*)handle;
  const int G = gate_count(a.cell);
  if (a.wdtype == 1) {
    if (G == 4) decoder_step_impl<bf16, 4>(a, pk, tokens, x, with_head);
    else if (G == 3) decoder_step_impl<bf16, 3>(a, pk, tokens, x, with_head);
    else decoder_step_impl<bf16, 1>(a, pk, tokens, x, with_head);
  } else {
    if (G == 4) decoder_step_impl<float, 4>(a, pk, tokens, x, with_head);
    else if (G == 3) decoder_step_impl<float, 3>(a, pk, tokens, x, with_head);
    else decoder_step_impl<float, 1>(a, pk, tokens, x, with_head);
  }
}

template <typename W, int G>
int64_t generate_impl(const DecoderArgs& a, const DecoderPack& pk, GenerateArgs& g) {
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
      decoder_step_body<W, G>(a, pk, tokens, nullptr, h_cur, h_nxt, sample_now, nt, tid);
      if (sample_now) {
        const int64_t j = n - (Pp - 1);  // index of the token being sampled
        for (int b = tid; b < B; b += nt) {
          int64_t tok = sample_row(a.logits + (long)b * V, V, g.temperature, g.top_k, g.top_p,
                                   g.seed, (uint64_t)b, g.first_step + (uint64_t)j, g.weights + (long)b * V,
                                   g.order + (long)b * V);
          if (tok < 0) {  // the first bad row (as the Python rule names it), not the last one
#pragma omp critical(rnnkern_generate_error)
            if (error_row < 0 || b < error_row) error_row = b;
            tok = 0;
          }
          g.out[(long)b * steps + j] = tok;
        }
#pragma omp barrier
      }
    }
  }
  // (a bad row samples token 0 and the streams go on, as in the CUDA decoder, whose state
  // after the error tests compare with this one's)
  g.error_row = error_row;
  return total;
}

int64_t generate(const DecoderArgs& a, const void* handle, GenerateArgs& g) {
  const DecoderPack& pk = *(const DecoderPack*)handle;
  const int G = gate_count(a.cell);
  if (a.wdtype == 1) {
    if (G == 4) return generate_impl<bf16, 4>(a, pk, g);
    if (G == 3) return generate_impl<bf16, 3>(a, pk, g);
    return generate_impl<bf16, 1>(a, pk, g);
  }
  if (G == 4) return generate_impl<float, 4>(a, pk, g);
  if (G == 3) return generate_impl<float, 3>(a, pk, g);
  return generate_impl<float, 1>(a, pk, g);
}

void forward_f32(const ForwardArgs& a) { layer_forward<float>(a); }
void forward_f64(const ForwardArgs& a) { layer_forward<double>(a); }
void backward_f32(const BackwardArgs& a) { layer_backward<float>(a); }
void backward_f64(const BackwardArgs& a) { layer_backward<double>(a); }

// ---------------------------------------------------------------------------------------------
// The large products around the recurrence: C[m, n] = sum_k A[m, k] * Bm[k, n] (+ bias[n]),
// rowsum[m] = sum_k A[m, k] when asked, A and Bm given by strides (so a transpose is a stride,
// not a copy). The layer uses it four ways, over all T*B rows at once:
//   gx    = x @ W_ihᵀ + b_ih        A = x [TB, I],       Bm = W_ihᵀ (strides 1, I)
//   dx    = dgx @ W_ih              A = dgx [TB, GH],    Bm = W_ih
//   dW_ih = dgxᵀ @ x, db_ih         A = dgxᵀ (strides 1, GH), rowsum = db_ih; same for dW_hh, dW_hr
// Cache-blocked around the panel microkernel (BLIS order): for each block of KC values of k,
// Bm's rows are packed into panels of 4 vectors (KC x 64 floats = 64 KB at KC = 256, read from
// L2), and each block of MC rows of A is packed into MC x KC (96 KB) rows, so the microkernel's
// broadcasts read contiguous memory; C tiles are accumulated over the k blocks. rowsum is
// summed while packing A (every element of A is packed exactly once).
// Why not torch's GEMM: torch's CPU GEMM is MKL, which runs its AVX2 code on AMD CPUs. 1 thread,
// 2-core AVX-512 x86-64 (interleaved medians): dW_hh of LSTM H=512, B=32, T=256 (M=2048,
// N=512, K=8192) 99 ms (173 GFLOP/s) against 177 ms for torch's a.t() @ b plus a.sum(0).

template <typename S>
void gemm(const GemmArgs& a) {
  typedef typename Vec<S>::type VT;
  constexpr int L = Vec<S>::lanes, NV = 4, MC = 96;
  const int M = a.M, N = a.N, K = a.K;
  // k blocks: one when K <= 2048, which spares C its read-modify-write passes (the packed A
  // block, MC x K, is then at most 768 KB), else 1024. Measured on a 2-core AMD Zen 4 (1 MB L2
  // per core, 2 threads) against the former KC = 256: dx = dgx W_ih (M=8192, N=512, K=2048)
  // 190 -> 221 GFLOP/s, dW = dgxᵀ h (M=2048, N=512, K=8192) 187 -> 193-201; KC = 128 was
  // 171-180. The FMA peak of that machine is 232 GFLOP/s.
  const int KC = K <= 2048 ? (K > 0 ? K : 1) : 1024;
  const S* A = (const S*)a.a;
  const S* Bm = (const S*)a.b;
  const S* bias = (const S*)a.bias;
  S* C = (S*)a.c;
  S* rowsum = (S*)a.rowsum;
  const long a_rs = a.a_rs, a_cs = a.a_cs, b_rs = a.b_rs, b_cs = a.b_cs;
  const PanelShape bs{1, N, KC, NV, L};
  const int np = bs.panels(), nmb = (M + MC - 1) / MC;
  if (K == 0) {  // an empty sum: C = bias (or 0), rowsum = 0
    for (int m = 0; m < M; ++m) {
      for (int n = 0; n < N; ++n) C[(long)m * N + n] = bias ? bias[n] : S(0);
      if (rowsum) rowsum[m] = S(0);
    }
    return;
  }
  S* bp = (S*)alloc_packed<S>((long)np * bs.panel_elems());
  const int nth = (long)M * N * K >= (1L << 24) ? omp_get_max_threads() : 1;
#pragma omp parallel num_threads(nth)
  {
    S* ap = (S*)alloc_packed<S>((long)MC * KC);
    for (int k0 = 0; k0 < K; k0 += KC) {
      const int kc = K - k0 < KC ? K - k0 : KC;
      const PanelShape s{1, N, kc, NV, L};
#pragma omp for schedule(static)
      for (int q = 0; q < np; ++q) {
        S* dst = bp + q * s.panel_elems();
        const int n0 = q * NV * L, width = N - n0 < NV * L ? N - n0 : NV * L;
        if (b_cs == 1) {  // rows of Bm are contiguous: a panel row is one copy
          for (int k = 0; k < kc; ++k) {
            S* d = dst + (long)k * NV * L;
            __builtin_memcpy(d, Bm + (long)(k0 + k) * b_rs + n0, width * sizeof(S));
            for (int c = width; c < NV * L; ++c) d[c] = S(0);
          }
        } else {
          for (int v = 0; v < NV; ++v)
            for (int l = 0; l < L; ++l) {
              const int n = n0 + v * L + l;
              S* d = dst + v * L + l;
              if (n >= N) {
                for (int k = 0; k < kc; ++k) d[(long)k * NV * L] = S(0);
              } else {
                const S* src = Bm + (long)k0 * b_rs + (long)n * b_cs;
                for (int k = 0; k < kc; ++k) d[(long)k * NV * L] = src[(long)k * b_rs];
              }
            }
        }
      }
      // (implicit barrier: every thread reads all of Bm's panels below)
#pragma omp for schedule(static)
      for (int mb = 0; mb < nmb; ++mb) {
        const int m0 = mb * MC, mc = M - m0 < MC ? M - m0 : MC;
        const S* a0 = A + (long)m0 * a_rs + (long)k0 * a_cs;
        if (a_cs == 1) {
          for (int i = 0; i < mc; ++i) __builtin_memcpy(ap + (long)i * kc, a0 + i * a_rs, kc * sizeof(S));
        } else {
          // Transpose in strips of 8 values of k, so that writes are 8 contiguous elements and
          // the reads 8 sequential streams (one k at a time, writing a cache line per element,
          // held the whole product at 130 GFLOP/s instead of 173).
          int k = 0;
          for (; k + 8 <= kc; k += 8) {
            const S* col = a0 + (long)k * a_cs;
            for (int i = 0; i < mc; ++i)
#pragma GCC unroll 8
              for (int j = 0; j < 8; ++j) ap[(long)i * kc + k + j] = col[(long)j * a_cs + i * a_rs];
          }
          for (; k < kc; ++k) {
            const S* col = a0 + (long)k * a_cs;
            for (int i = 0; i < mc; ++i) ap[(long)i * kc + k] = col[i * a_rs];
          }
        }
        if (rowsum) {
          for (int i = 0; i < mc; ++i) {
            S sum = k0 == 0 ? S(0) : rowsum[m0 + i];
            for (int k = 0; k < kc; ++k) sum += ap[(long)i * kc + k];
            rowsum[m0 + i] = sum;
          }
        }
        for (int q = 0; q < np; ++q) {
          panel_rows<NV, S, S>(mc, kc, ap, kc, bp + q * s.panel_elems(),
                               [&](int r0, int mr, VT(*acc)[NV]) {
            for (int v = 0; v < NV; ++v) {
              const int n0 = (q * NV + v) * L, n = N - n0 < L ? N - n0 : L;
              if (n <= 0) break;
              VT b = VT{};
              if (k0 == 0 && bias) {
                if (n == L)
                  b = load_vec<VT>(bias + n0);
                else
                  for (int l = 0; l < n; ++l) b[l] = bias[n0 + l];
              }
              for (int r = 0; r < mr; ++r) {
                S* c = C + (long)(m0 + r0 + r) * N + n0;
                VT t = acc[r][v] + b;
                if (n == L) {
                  if (k0) t += load_vec<VT>(c);
                  __builtin_memcpy(c, &t, sizeof t);
                } else {
                  for (int l = 0; l < n; ++l) c[l] = k0 ? c[l] + t[l] : t[l];
                }
              }
            }
          });
        }
      }
    }
    free(ap);
  }
  free(bp);
}

void gemm_f32(const GemmArgs& a) { gemm<float>(a); }
void gemm_f64(const GemmArgs& a) { gemm<double>(a); }
