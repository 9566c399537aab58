// Whole-sequence generation in one launch: for B streams and n tokens, every layer of a stacked
// LSTM (with or without projection) / GRU / Elman RNN, the output head, the sampling rule of
// rnnkern/sampling.py (csrc/common/sampling_rule.h) and the feedback of each sampled token
// through the token table, all in one persistent cooperative kernel (rnnkern.Decoder with
// backend="cuda").
//
// Legend: B streams, L layers, I input size of layer 0, H hidden, P state size (proj_size or
// H), G gates, V head outputs (vocabulary).
//
// Work split (as the training kernels, recurrence.cu). The grid has at most one block per SM.
// Block k owns hidden units [k*Hb, (k+1)*Hb) of every layer with all G of their gates, state
// units [k*Pb, ...) of every projection and head rows [k*Vb, ...). Its slices of every matrix
// are copied to shared memory once per launch and stay there for all tokens when they fit
// ("resident": 3x512 LSTM, V=137, fp32 on 128 blocks: 164 KB per block); otherwise they are read
// from global memory every step, where they live in L2.
//
// One model step: for each layer, the block's G*Hb pre-activations (recurrent part from the
// layer's previous state, then input part from the token table or the layer below), the cell,
// the block's units of the new state; the next layer needs all of it (an LSTM projection first
// needs all of m = o * tanh(c) for h = W_hr m). Then the head writes the block's logits.
// Sampling needs no further exchange: every block samples every stream itself from the same
// logits with the same code, so all blocks hold the same tokens (bit-identical inputs,
// deterministic arithmetic) and go on to the next step's token-table lookups directly.
//
// Two ways to wait for the other blocks' results, the same arithmetic in the same order
// (bit-identical results):
// - barrier: a grid-wide barrier after every layer (and projection input) and after the head,
//   then plain float loads through L2. L + 1 barriers per token (2L + 1 with projection).
// - flags (default): every exchanged value is also written as a 64-bit word {float, tag of
//   the phase that wrote it} and readers spin on exactly the words they need (see
//   stage_words). No barrier at all, and one L2 round trip per exchange instead of three.
//
// Carry (when the batch is one chunk): layer l's recurrent part for step n + 1,
// W_hh_l h_l(n), is formed at step n right after the block has staged h_l(n) anyway (as layer
// l + 1's input, or the head's for the top layer: with carry every block stages it, also
// those that own no head rows), after the work the others wait for. Step n + 1 then starts
// layer l from it: layer 0 needs only the token, and no layer waits for its previous state.
//
// The state is a ping-pong pair per layer (h[parity], h[parity ^ 1], and the same for the
// exchange words): a block may still read a layer's previous state while another block
// writes that layer's new one. That is the only reuse hazard without barriers: any block
// writing a slot for step n has read values every block wrote in step n - 1 after finishing
// its reads of that slot's step n - 2 contents (each block runs its phases in order); m gets
// one buffer per layer for the same reason. With carry, a block that skips staging h_l(n) at
// step n + 1 has staged it from every block at step n, which keeps that argument whole: it is
// why blocks without head rows still stage the top state. The cell state c of a unit is read
// and written only by its owning block, in place.
//
// Numerics are the CPU decoder's: float32 state and accumulation, bfloat16 weights widened to
// float32, the token table in float32; sampling in float64 by the shared rule.

#include <cfloat>

#include "../common/sampling_rule.h"
#include "device_common.cuh"

namespace rnnkern_cuda {
namespace {

// Batch rows staged per matrix-vector product (at most); the planner shrinks it to fit.
constexpr int kGenMaxBatchChunk = 64;

// Everything the kernel needs besides the arguments: work split and shared-memory layout (byte
// offsets into the dynamic shared memory; computed on the host by make_generate_plan).
struct GenPlan {
  int blocks, Hb, Pb, Vb;
  int Bc;        // batch chunk of the matrix-vector products
  int Bs;        // warps sampling at once (one stream each)
  int Kx;        // row length of the staged layer input (I, P or H)
  int resident;  // matrix slices in shared memory
  int flags;     // exchange through flag-carrying words instead of grid barriers
  int carry;     // recurrent parts formed a step early (one batch chunk; see the kernel)
  size_t off_toks;     // [B] int64 tokens of the current step
  size_t off_partial;  // [kPartial] float split-K partial sums
  size_t off_x;        // [Bc][Kx] float staged input rows (layer input, or m)
  size_t off_h;        // [Bc][P] float staged previous-state rows (or the top state for the head)
  size_t off_pre_i;    // [Bc][G*Hb] float input part of the pre-activations
  size_t off_pre_h;    // [Bc][G*Hb] float recurrent part
  size_t off_samp;     // Bs sampling slots (overlay the four above: never live together)
  size_t samp_slot;    // bytes of one slot: w, cum [V] double; rank, order [V] int
  size_t off_carry;    // [L][B][G*Hb] float carried recurrent parts (carry)
  size_t off_weights;  // resident slices, layer by layer (see SliceBytes)
  size_t off_head;     // resident head slice [Vb][P]
  size_t smem;
  long long timeout_ns;
};

// Bytes of layer l's resident matrix slices (each 16-byte aligned): W_ih rows [G*Hb][K] (none
// for layer 0 with a token table), W_hh rows [G*Hb][P], W_hr rows [Pb][H] (projection).
struct SliceBytes {
  size_t wi, wh, wr;
};

__host__ __device__ inline SliceBytes slice_bytes(int l, bool table, int G, int Hb, int Pb,
                                                  int I, int H, int P, bool proj, int es) {
  const size_t rows = static_cast<size_t>(G) * Hb;
  SliceBytes s;
  s.wi = (l == 0 && table) ? 0 : align16(es * rows * (l == 0 ? I : P));
  s.wh = align16(es * rows * P);
  s.wr = proj ? align16(es * static_cast<size_t>(Pb) * H) : 0;
  return s;
}

// ---------------------------------------------------------------------------------------------
// sampling: one warp per stream, the rule of csrc/common/sampling_rule.h
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ double warp_max(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// The token of one stream from its logits row (logit(v) for v < V: written by other blocks,
// read through L2), or -1 when the row holds NaN or +inf or only -inf. Called by all 32 lanes
// of a warp; every lane returns the same value. w, cum / rank, order: the warp's scratch [V]
// in shared memory. The parallel parts (weights, ranks, searches) compute per token what the
// sequential rule does; the sums run on lane 0 in the rule's order, so the token is the C++
// decoder's bit for bit up to exp's last bit.
template <typename Logit>
__device__ int64_t warp_sample(Logit logit, int V, double temperature, int top_k, double top_p,
                               uint64_t seed, uint64_t stream, uint64_t step, double* w,
                               double* cum, int32_t* rank, int32_t* order) {
  using namespace rnnkern_rule;
  const int lane = threadIdx.x % 32;
  bool ok = true;
  double z_max = -HUGE_VAL;
  for (int v = lane; v < V; v += 32) {
    double z;
    ok = scaled_logit(logit(v), temperature, &z) && ok;
    w[v] = z;
    z_max = fmax(z_max, z);
  }
  ok = __all_sync(0xffffffffu, ok);
  z_max = warp_max(z_max);
  if (!ok || z_max == -HUGE_VAL) return -1;
  for (int v = lane; v < V; v += 32) w[v] = weight_of(w[v], z_max);
  __syncwarp();

  const bool by_k = top_k > 0 && top_k < V, by_p = top_p < 1.0;
  if (by_k || by_p) {
    // rank[v] = how many tokens rank before v (a permutation of 0..V-1: ranks_before is a
    // strict total order); order is its inverse. A lane holds up to 4 tokens per pass, and
    // every lane reads w[u] at the same u (a shared-memory broadcast).
    constexpr int kPer = 4;
    for (int v0 = 0; v0 < V; v0 += 32 * kPer) {
      int vv[kPer], r[kPer];
      double wv[kPer];
#pragma unroll
      for (int q = 0; q < kPer; ++q) {
        vv[q] = v0 + q * 32 + lane;
        wv[q] = vv[q] < V ? w[vv[q]] : 0.0;
        r[q] = 0;
      }
      for (int u = 0; u < V; ++u) {
        const double wu = w[u];
#pragma unroll
        for (int q = 0; q < kPer; ++q) r[q] += ranks_before(wu, u, wv[q], vv[q]) ? 1 : 0;
      }
#pragma unroll
      for (int q = 0; q < kPer; ++q) {
        if (vv[q] < V) {
          rank[vv[q]] = r[q];
          order[r[q]] = vv[q];
        }
      }
    }
    __syncwarp();
    long long last = 0;
    if (lane == 0) last = last_kept(w, order, by_k ? top_k : V, top_p);
    last = __shfl_sync(0xffffffffu, last, 0);
    __syncwarp();  // lane 0's reads of w are ordered before the writes below
    for (int v = lane; v < V; v += 32)
      if (rank[v] > last) w[v] = 0.0;
    __syncwarp();
  }
  // 5. inverse CDF: lane 0 forms the running sums (sequential: the rule's order, the one
  // dependent chain left), then the warp searches them: the first id whose running sum
  // exceeds r (always a kept id: a dropped one adds 0.0), else, when rounding leaves none,
  // the last id with a non-zero weight; inverse_cdf's token, found 32 ids per step.
  if (lane == 0) running_sums(w, V, cum);
  __syncwarp();
  const double r = uniform(seed, stream, step) * cum[V - 1];
  long long tok = -1;
  for (int v0 = 0; v0 < V && tok < 0; v0 += 32) {
    const unsigned hit = __ballot_sync(0xffffffffu, v0 + lane < V && cum[v0 + lane] > r);
    if (hit) tok = v0 + __ffs(hit) - 1;
  }
  for (int v0 = (V - 1) / 32 * 32; v0 >= 0 && tok < 0; v0 -= 32) {
    const unsigned nz = __ballot_sync(0xffffffffu, v0 + lane < V && w[v0 + lane] > 0.0);
    if (nz) tok = v0 + 31 - __clz(nz);
  }
  __syncwarp();  // the slot is reused by this warp's next stream
  return tok;
}

// ---------------------------------------------------------------------------------------------
// the kernel
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ LayerWeights load_layer(const LayerWeights* p) {
  LayerWeights lw;
  lw.w_ih = reinterpret_cast<const void*>(__ldg(reinterpret_cast<const long long*>(&p->w_ih)));
  lw.w_hh = reinterpret_cast<const void*>(__ldg(reinterpret_cast<const long long*>(&p->w_hh)));
  lw.b_ih = reinterpret_cast<const float*>(__ldg(reinterpret_cast<const long long*>(&p->b_ih)));
  lw.b_hh = reinterpret_cast<const float*>(__ldg(reinterpret_cast<const long long*>(&p->b_hh)));
  lw.w_hr = reinterpret_cast<const void*>(__ldg(reinterpret_cast<const long long*>(&p->w_hr)));
  return lw;
}

// Records the first non-fatal error (the first writer wins; sync[3] is its row).
__device__ __forceinline__ void record_error(unsigned long long* sync, unsigned long long code,
                                             int row) {
  if (atomicCAS(sync + 2, 0ULL, code) == 0ULL) sync[3] = static_cast<unsigned long long>(row);
}

// ---- flag-carrying exchange ("flags" mode): values other blocks read travel as 64-bit words
// {float bits, 32-bit tag of the phase that wrote them}. One aligned 64-bit store writes both,
// and one 64-bit load reads both, so a reader that sees the tag it waits for sees that phase's
// value: no barrier and no fence (NCCL's LL protocol works the same way). A reader waits for
// exactly the producers of what it reads, one L2 round trip after they write, instead of a
// grid-wide barrier (two round trips) followed by the load (a third).

#ifndef RNNKERN_CUDA_EMULATION
__device__ __forceinline__ unsigned long long ld_relaxed(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_relaxed(unsigned long long* p, unsigned long long v) {
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" : : "l"(p), "l"(v) : "memory");
}
#else
// Emulation (emulation.h; a polling thread lets the others run in global_ns).
inline unsigned long long ld_relaxed(const unsigned long long* p) {
  return __atomic_load_n(p, __ATOMIC_RELAXED);
}

inline void st_relaxed(unsigned long long* p, unsigned long long v) {
  __atomic_store_n(p, v, __ATOMIC_RELAXED);
}
#endif

__device__ __forceinline__ unsigned long long tagged(float v, uint32_t tag) {
  return (static_cast<unsigned long long>(tag) << 32) | __float_as_uint(v);
}

// How a wait behaves: the status words, the timeout, and an optional pause between polls
// (GenerateArgs::spin_sleep_ns; 0: poll back to back).
struct Waiter {
  unsigned long long* sync;
  long long timeout_ns;
  unsigned int sleep_ns;
};

// The value of word *p once it carries `tag`; NaN when the launch must stop instead (another
// block aborted it, or this wait passed the timeout: then it aborts it with
// kErrBarrierTimeout in sync[1]), with *failed set.
__device__ __forceinline__ float wait_word(const unsigned long long* p, unsigned long long w,
                                           uint32_t tag, const Waiter& wt, bool* failed) {
  if (static_cast<uint32_t>(w >> 32) != tag) {
    unsigned long long* sync = wt.sync;
    const long long timeout_ns = wt.timeout_ns;
    const long long start = global_ns();
    unsigned int spins = 0;
    do {
      if (wt.sleep_ns) __nanosleep(wt.sleep_ns);
      if ((++spins & 255u) == 0) {
        poll_pause();
        if (ld_relaxed(sync + 1) != kErrNone ||
            (timeout_ns > 0 && global_ns() - start > timeout_ns)) {
          atomicCAS(sync + 1, 0ULL, static_cast<unsigned long long>(kErrBarrierTimeout));
          *failed = true;
          return __int_as_float(0x7fc00000);
        }
      }
      w = ld_relaxed(p);
    } while (static_cast<uint32_t>(w >> 32) != tag);
  }
  return __uint_as_float(static_cast<uint32_t>(w));
}

// stage_rows for exchanged words: rows [b0, b0+nb) of src [B][K] into dst [nb][K] floats once
// every word carries `tag`. Called by every thread; returns false (in every thread) when the
// launch must stop. kStageUnroll loads are issued before the first wait, as in stage_rows.
__device__ bool stage_words(float* dst, const unsigned long long* src, int b0, int nb, int K,
                            uint32_t tag, const Waiter& wt) {
  const unsigned long long* s = src + static_cast<size_t>(b0) * K;
  const int n = nb * K;
  bool failed = false;
  for (int i0 = threadIdx.x; i0 < n; i0 += kStageUnroll * kThreads) {
    unsigned long long w[kStageUnroll];
#pragma unroll
    for (int u = 0; u < kStageUnroll; ++u) {
      const int i = i0 + u * kThreads;
      w[u] = i < n ? ld_relaxed(s + i) : 0ULL;
    }
#pragma unroll
    for (int u = 0; u < kStageUnroll; ++u) {
      const int i = i0 + u * kThreads;
      if (i < n && !failed) dst[i] = wait_word(s + i, w[u], tag, wt, &failed);
    }
  }
  return __syncthreads_or(failed) == 0;
}

// One warp: the V words at src into dst[v] (each float widened to double, exactly) once they
// carry `tag`. Returns true (in every lane) when the launch must stop.
__device__ bool warp_stage_words(double* dst, const unsigned long long* src, int V, uint32_t tag,
                                 const Waiter& wt) {
  const int lane = threadIdx.x % 32;
  bool failed = false;
  for (int v0 = lane; v0 < V; v0 += kStageUnroll * 32) {
    unsigned long long w[kStageUnroll];
#pragma unroll
    for (int u = 0; u < kStageUnroll; ++u) {
      const int v = v0 + u * 32;
      w[u] = v < V ? ld_relaxed(src + v) : 0ULL;
    }
#pragma unroll
    for (int u = 0; u < kStageUnroll; ++u) {
      const int v = v0 + u * 32;
      if (v < V && !failed) dst[v] = wait_word(src + v, w[u], tag, wt, &failed);
    }
  }
  const bool any = __any_sync(0xffffffffu, failed);
  __syncwarp();
  return any;
}

template <typename W, int CELL, bool PROJ>
__global__ void __launch_bounds__(kThreads, 1) generate_kernel(GenerateArgs a, GenPlan plan) {
  constexpr int G = gate_count(CELL);
  RNNKERN_DYNAMIC_SMEM(smem);
  const int B = a.B, L = a.L, I = a.I, H = a.H, P = a.P, V = a.V, GH = G * H;
  const bool table = a.table != nullptr;
  const int Hb = plan.Hb, Pb = plan.Pb, Vb = plan.Vb, Bc = plan.Bc, C = G * Hb;
  const int j0 = blockIdx.x * Hb, nj = max(0, min(H, j0 + Hb) - j0);
  const int p0 = blockIdx.x * Pb, np = max(0, min(P, p0 + Pb) - p0);
  const int v0 = blockIdx.x * Vb, nv = max(0, min(V, v0 + Vb) - v0);
  constexpr bool proj = CELL == kLSTM && PROJ;
  const int es = static_cast<int>(sizeof(W));
  int64_t* toks = reinterpret_cast<int64_t*>(smem + plan.off_toks);
  float* part = reinterpret_cast<float*>(smem + plan.off_partial);
  float* xs = reinterpret_cast<float*>(smem + plan.off_x);
  float* hs = reinterpret_cast<float*>(smem + plan.off_h);
  float* pre_i = reinterpret_cast<float*>(smem + plan.off_pre_i);
  float* pre_h = reinterpret_cast<float*>(smem + plan.off_pre_h);
  GridBarrier bar{a.sync, a.sync + 1, gridDim.x, 0, plan.timeout_ns};
  const bool reporter = blockIdx.x == 0;  // every block finds the same errors; one reports

  // Row sets of the block's slices of layer l: W_ih (K = I for layer 0, else P), W_hh, W_hr.
  struct LayerRows {
    Rows<W> wi, wh, wr;
  };
  auto global_rows = [&](int l, const LayerWeights& lw) {
    const int K = l == 0 ? I : P;
    LayerRows r;
    // (w_ih of layer 0 with a token table and w_hr without a projection are null, never read)
    const W* wi = static_cast<const W*>(lw.w_ih);
    const W* wr = static_cast<const W*>(lw.w_hr);
    r.wi = Rows<W>{wi ? wi + static_cast<size_t>(j0) * K : nullptr,
                   static_cast<long long>(H) * K, max(nj, 1), K};
    r.wh = Rows<W>{static_cast<const W*>(lw.w_hh) + static_cast<size_t>(j0) * P,
                   static_cast<long long>(H) * P, max(nj, 1), P};
    r.wr = Rows<W>{wr ? wr + static_cast<size_t>(p0) * H : nullptr, 0, max(np, 1), H};
    return r;
  };
  // Resident copies are dense, [G][nj][K], [G][nj][P] and [np][H], from byte offset `off`
  // (advanced past the layer's slices).
  auto resident_rows = [&](int l, size_t& off) {
    const int K = l == 0 ? I : P;
    const SliceBytes sb = slice_bytes(l, table, G, Hb, Pb, I, H, P, proj, es);
    LayerRows r;
    r.wi = Rows<W>{reinterpret_cast<const W*>(smem + off), static_cast<long long>(nj) * K,
                   max(nj, 1), K};
    r.wh = Rows<W>{reinterpret_cast<const W*>(smem + off + sb.wi),
                   static_cast<long long>(nj) * P, max(nj, 1), P};
    r.wr = Rows<W>{reinterpret_cast<const W*>(smem + off + sb.wi + sb.wh), 0, max(np, 1), H};
    off += sb.wi + sb.wh + sb.wr;
    return r;
  };
  const Rows<W> head_global{
      nv > 0 ? static_cast<const W*>(a.head_w) + static_cast<size_t>(v0) * P : nullptr, 0,
      max(nv, 1), P};
  const Rows<W> head_rows =
      plan.resident ? Rows<W>{reinterpret_cast<const W*>(smem + plan.off_head), 0, max(nv, 1), P}
                    : head_global;

  if (plan.resident) {  // copy the block's slices in once; they stay for every token
    size_t off = plan.off_weights;
    for (int l = 0; l < L; ++l) {
      const LayerRows src = global_rows(l, load_layer(a.layers + l));
      const LayerRows dst = resident_rows(l, off);
      if (!(l == 0 && table)) stage_weights(const_cast<W*>(dst.wi.base), src.wi, G * nj);
      stage_weights(const_cast<W*>(dst.wh.base), src.wh, G * nj);
      if (proj) stage_weights(const_cast<W*>(dst.wr.base), src.wr, np);
    }
    if (V > 0) stage_weights(const_cast<W*>(head_rows.base), head_global, nv);
    __syncthreads();
  }

  const int steps = a.steps;
  const int model_steps = a.feed + (steps > 0 ? steps - 1 : 0);
  const bool flags = plan.flags != 0;
  const Waiter waiter{a.sync, plan.timeout_ns, static_cast<unsigned int>(a.spin_sleep_ns)};
  // Tag of what phase i of model step n writes (flags mode): i = 2l for layer l's new state,
  // 2l + 1 for its projection input m, 2L for the logits. The host never reuses a tag within
  // the lifetime of the exchange buffers and never uses 0 (their initial value).
  const int phases = 2 * L + 1;
  auto tag_of = [&](int n, int i) {
    return static_cast<uint32_t>(a.tag_base + static_cast<uint64_t>(n) * phases + i);
  };
  // Rows of data written during this launch by other blocks: exchanged words (flags mode), or
  // floats behind the grid barrier that preceded (barrier mode).
  auto stage_exchanged = [&](float* dst, const float* plain, const unsigned long long* words,
                             int b0, int nb, int K, uint32_t tag) {
    if (flags) return stage_words(dst, words, b0, nb, K, tag, waiter);
    stage_rows(dst, plain, b0, nb, K);
    return true;
  };
  // Barrier mode: every block meets here. Flags mode: nothing (readers wait for their words).
  auto meet = [&]() { return flags ? true : bar.wait(); };

  // Carry (plan.carry: one batch chunk, B <= Bc): a layer's recurrent part for step n + 1,
  // W_hh_l h_l(n), is formed at step n where h_l(n) is staged anyway (as the input of layer
  // l + 1, or of the head for the top layer), after the work that others wait for. Step n + 1
  // then starts layer l from it: no staging and no matrix-vector product before its cell
  // (layer 0 only needs the token). The same products of the same staged values: the results
  // are bit-identical to forming them at step n + 1.
  const bool carry = plan.carry != 0;
  float* carry_s = reinterpret_cast<float*>(smem + plan.off_carry);  // [L][B][G*Hb]
  unsigned carried = 0, carrying = 0;  // bit l: carry_s[l] holds W_hh_l h_l(step - 1)
  auto carried_part = [&](int l) { return carry_s + static_cast<size_t>(l) * B * C; };

  // W_hh rows of layer l whose resident slices start at byte offset `at` (for carrying).
  auto hh_rows = [&](int l, size_t at) {
    return plan.resident ? resident_rows(l, at).wh : global_rows(l, load_layer(a.layers + l)).wh;
  };

  int cur = a.parity;
  size_t at_below = 0;  // resident offset of the layer below the current one (then: the top)
  const int trace_points = generate_trace_points(L);
  auto stamp = [&](int n, int point) {
    trace_point(a.trace, a.trace_steps, n, point, trace_points);
  };
  for (int n = 0; n < model_steps; ++n) {
    stamp(n, 0);
    const int nxt = cur ^ 1;
    carried = carrying;
    carrying = 0;
    const bool carry_now = carry && n + 1 < model_steps;  // the last step has no successor
    // Tokens of this step: the prime's column n, else the tokens sampled after step n - 1
    // (already in toks).
    // A token outside the table (the Decoder checks the prime first) is reported and
    // replaced by 0, and generation goes on, as the C++ decoder does with a failed sample.
    if (table && n < a.feed) {
      for (int b = threadIdx.x; b < B; b += kThreads) {
        int64_t t = a.prime[static_cast<size_t>(b) * a.feed + n];
        if (t < 0 || t >= a.vocab_in) {
          if (reporter) record_error(a.sync, kErrBadToken, b);
          t = 0;
        }
        toks[b] = t;
      }
      __syncthreads();
    }

    // ---- layers
    size_t off = plan.off_weights;
    for (int l = 0; l < L; ++l) {
      const LayerWeights lw = load_layer(a.layers + l);
      const size_t at = off;
      const LayerRows rows = plan.resident ? resident_rows(l, off) : global_rows(l, lw);
      const int K = (l == 0 && table) ? 0 : (l == 0 ? I : P);  // staged input length
      const size_t slot_prev = (static_cast<size_t>(cur) * L + l) * B * P;
      const size_t slot_next = (static_cast<size_t>(nxt) * L + l) * B * P;
      const size_t slot_below = (static_cast<size_t>(nxt) * L + l - 1) * B * P;  // l >= 1
      float* h_next = a.h + slot_next;
      float* c = CELL == kLSTM ? a.c + static_cast<size_t>(l) * B * H : nullptr;
      const uint32_t tag_out = tag_of(n, 2 * l);
      const bool have = (carried >> l) & 1u;  // recurrent part carried from step n - 1
      const float* rec = have ? carried_part(l) : pre_h;  // [nb][G*Hb]
      for (int b0 = 0; b0 < B; b0 += Bc) {  // (every block owns units: nj > 0)
        const int nb = min(Bc, B - b0);
        if (!have) {
          // The recurrent part first: it needs only the previous step's state (from before
          // the launch at n = 0), so in flags mode it runs while the layer below finishes.
          const bool ok = n == 0 ? (stage_rows(hs, a.h + slot_prev, b0, nb, P), true)
                                 : stage_exchanged(hs, a.h + slot_prev, a.xh + slot_prev, b0, nb,
                                                   P, tag_of(n - 1, 2 * l));
          if (!ok) return;
          __syncthreads();
          block_matvec_tiled<W>(hs, P, nb, P, G * nj, rows.wh, part, [&](int bb, int r, float v) {
            pre_h[bb * C + (r / nj) * Hb + r % nj] = v;
          });
        }
        if (K > 0) {
          const bool ok = l == 0 ? (stage_rows(xs, a.x, b0, nb, K), true)
                                 : stage_exchanged(xs, a.h + slot_below, a.xh + slot_below, b0,
                                                   nb, K, tag_of(n, 2 * (l - 1)));
          if (!ok) return;
          __syncthreads();
          if (b0 == 0 && l >= 1) stamp(n, 1 + 2 * l);
          block_matvec_tiled<W>(xs, K, nb, K, G * nj, rows.wi, part,
                                [&](int bb, int r, float v) {
                                  pre_i[bb * C + (r / nj) * Hb + r % nj] = v;
                                });
        }
        __syncthreads();
        for (int i = threadIdx.x; i < nb * nj; i += kThreads) {
          const int bb = i / nj, jj = i % nj, b = b0 + bb, j = j0 + jj;
          float gx[G], gh[G];
#pragma unroll
          for (int g = 0; g < G; ++g) {
            gh[g] = rec[bb * C + g * Hb + jj] + (lw.b_hh ? __ldg(lw.b_hh + g * H + j) : 0.f);
            gx[g] = K == 0 ? __ldg(a.table + static_cast<size_t>(toks[b]) * GH + g * H + j)
                           : pre_i[bb * C + g * Hb + jj] +
                                 (lw.b_ih ? __ldg(lw.b_ih + g * H + j) : 0.f);
          }
          const float c_prev = CELL == kLSTM ? c[static_cast<size_t>(b) * H + j] : 0.f;
          // The unit's previous state (GRU): staged, or when carried, this block's own write
          // of step n - 1 (without a projection a unit's state is its owner's).
          const float hp = CELL != kGRU ? 0.f
                           : have       ? a.h[slot_prev + static_cast<size_t>(b) * P + j]
                                        : hs[bb * P + j];
          const CellStep<CELL> cs = cell_step<CELL>(gx, gh, c_prev, hp);
          if (CELL == kLSTM) c[static_cast<size_t>(b) * H + j] = cs.c;
          if (proj) {
            const size_t bj = static_cast<size_t>(b) * H + j;
            if (flags)
              st_relaxed(a.xm + static_cast<size_t>(l) * B * H + bj,
                         tagged(cs.h, tag_of(n, 2 * l + 1)));
            else
              a.m[bj] = cs.h;
          } else {
            const size_t bj = static_cast<size_t>(b) * P + j;
            h_next[bj] = cs.h;
            if (flags) st_relaxed(a.xh + slot_next + bj, tagged(cs.h, tag_out));
          }
        }
        __syncthreads();  // hs, xs and pre are reused by the next chunk
      }
      if (carry_now && l >= 1) {  // xs holds h_{l-1}(n) of every stream: carry layer l - 1
        block_matvec_tiled<W>(xs, P, B, P, G * nj, hh_rows(l - 1, at_below), part,
                              [&](int bb, int r, float v) {
                                carried_part(l - 1)[bb * C + (r / nj) * Hb + r % nj] = v;
                              });
        carrying |= 1u << (l - 1);
        __syncthreads();  // xs is staged again next
      }
      if (proj) {  // h = W_hr m for the block's state units; needs all of m
        if (!meet()) return;
        if (np > 0) {
          const size_t m_slot = static_cast<size_t>(l) * B * H;
          for (int b0 = 0; b0 < B; b0 += Bc) {
            const int nb = min(Bc, B - b0);
            if (!stage_exchanged(xs, a.m, a.xm + m_slot, b0, nb, H, tag_of(n, 2 * l + 1)))
              return;
            __syncthreads();
            block_matvec_tiled<W>(xs, H, nb, H, np, rows.wr, part, [&](int bb, int pp, float v) {
              const size_t bp = static_cast<size_t>(b0 + bb) * P + p0 + pp;
              h_next[bp] = v;
              if (flags) st_relaxed(a.xh + slot_next + bp, tagged(v, tag_out));
            });
            __syncthreads();
          }
        }
      }
      stamp(n, 2 + 2 * l);  // (every path above ends in a block-wide synchronisation)
      if (!meet()) return;  // the next layer (and the head) read all of h_next
      at_below = at;
    }
    cur = nxt;

    // ---- head and sampling (after the last fed step, and after every sampled token's step)
    if (V == 0 || n < a.feed - 1) continue;
    const size_t slot_top = (static_cast<size_t>(cur) * L + L - 1) * B * P;
    const uint32_t tag_logits = tag_of(n, 2 * L);
    if (nv > 0 || carry_now) {  // with carry every block stages the top state (top comment)
      for (int b0 = 0; b0 < B; b0 += Bc) {
        const int nb = min(Bc, B - b0);
        if (!stage_exchanged(hs, a.h + slot_top, a.xh + slot_top, b0, nb, P,
                             tag_of(n, 2 * (L - 1))))
          return;
        __syncthreads();
        if (nv > 0)
          block_matvec_tiled<W>(hs, P, nb, P, nv, head_rows, part, [&](int bb, int vv, float v) {
            const size_t bv = static_cast<size_t>(b0 + bb) * V + v0 + vv;
            const float logit = v + (a.head_b ? __ldg(a.head_b + v0 + vv) : 0.f);
            a.logits[bv] = logit;
            if (flags) st_relaxed(a.xl + bv, tagged(logit, tag_logits));
          });
        if (carry_now) {  // one chunk: hs holds h_{L-1}(n) of every stream
          block_matvec_tiled<W>(hs, P, B, P, G * nj, hh_rows(L - 1, at_below), part,
                                [&](int bb, int r, float v) {
                                  carried_part(L - 1)[bb * C + (r / nj) * Hb + r % nj] = v;
                                });
          carrying |= 1u << (L - 1);
        }
        __syncthreads();
      }
    }
    stamp(n, 2 * L + 1);
    if (steps == 0) continue;  // logits only (Decoder.step): the launch's end publishes them
    if (!meet()) return;       // every block samples from all of the logits
    const int j = n - (a.feed - 1);  // index of the token being sampled
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    bool failed = false;
    if (warp < plan.Bs) {
      unsigned char* slot = smem + plan.off_samp + plan.samp_slot * warp;
      double* w = reinterpret_cast<double*>(slot);
      double* cum = w + V;
      int32_t* rank = reinterpret_cast<int32_t*>(cum + V);
      int32_t* order = rank + V;
      for (int b = warp; b < B; b += plan.Bs) {
        const size_t row = static_cast<size_t>(b) * V;
        // Flags mode: the row's words go to the slot first, several loads in flight per
        // lane (as in stage_words), then the rule reads them from there.
        if (flags) failed = warp_stage_words(w, a.xl + row, V, tag_logits, waiter) || failed;
        auto logit = [&](int v) {
          return flags ? static_cast<float>(w[v]) : __ldcg(a.logits + row + v);
        };
        const int64_t tok = warp_sample(logit, V, a.temperature, a.top_k, a.top_p, a.seed,
                                        static_cast<uint64_t>(b),
                                        a.first_step + static_cast<uint64_t>(j), w, cum, rank,
                                        order);
        if (lane == 0) {
          // Non-finite logits: reported, and the stream goes on with token 0 (as in the C++
          // decoder; the Decoder raises after the launch).
          if (tok < 0 && reporter) record_error(a.sync, kErrNonFinite, b);
          toks[b] = tok < 0 ? 0 : tok;
          if (reporter) a.out[static_cast<size_t>(b) * steps + j] = tok < 0 ? 0 : tok;
        }
      }
    }
    // toks are read by the next step; the slots overlay the staging buffers
    if (__syncthreads_or(failed)) return;
    stamp(n, 2 * L + 2);
  }
}

// ---------------------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------------------

GenPlan make_generate_plan(const GenerateArgs& a, bool proj, int sms, size_t budget) {
  const int G = gate_count(a.cell);
  const bool table = a.table != nullptr, sampling = a.steps > 0;
  GenPlan p{};
  p.flags = a.flags != 0;
  const int max_blocks = std::max(1, std::min(sms, a.H));
  p.Hb = (a.H + max_blocks - 1) / max_blocks;
  p.blocks = (a.H + p.Hb - 1) / p.Hb;
  p.Pb = proj ? (a.P + p.blocks - 1) / p.blocks : p.Hb;
  // Every block owns at least one hidden unit ((blocks - 1) * Hb < H): in flags mode every
  // block's words are waited for, and its phases pace the others (generate.cu, top).
  p.Vb = a.V > 0 ? (a.V + p.blocks - 1) / p.blocks : 0;
  p.Kx = std::max({table ? 0 : a.I, a.L > 1 ? a.P : 0, proj ? a.H : 0, 1});
  const int es = elem_size(a.wdtype);
  size_t weights = 0;
  for (int l = 0; l < a.L; ++l) {
    const SliceBytes s = slice_bytes(l, table, G, p.Hb, p.Pb, a.I, a.H, a.P, proj, es);
    weights += s.wi + s.wh + s.wr;
  }
  const size_t head = align16(static_cast<size_t>(es) * p.Vb * a.P);
  p.samp_slot = align16(24 * static_cast<size_t>(a.V));  // 8 + 8 + 4 + 4 bytes per token
  const int C = G * p.Hb;
  const int model_steps = a.feed + (a.steps > 0 ? a.steps - 1 : 0);
  // Copying the slices in costs about what reading them once does, so a launch of one model
  // step (Decoder.step) reads them from global memory.
  const int first_resident = model_steps > 1 ? 1 : 0;
  // Carrying recurrent parts needs the whole batch in one chunk, a second step to use them,
  // and a bit per layer.
  const int first_carry = a.carry && model_steps > 1 && a.L <= 32 && a.B <= kGenMaxBatchChunk;
  // Preferences, in order: weights resident; carried recurrent parts; as many warps sampling
  // at once as fit (each needs a 24 V-byte slot); the largest batch chunk.
  const int all_warps = std::min(a.B, kWarps);
  for (int resident = first_resident; resident >= 0; --resident) {
    for (int carry = first_carry; carry >= 0; --carry) {
      for (int want_bs = sampling ? all_warps : 1; want_bs >= 1; --want_bs) {
        const int max_bc = std::min(a.B, kGenMaxBatchChunk);
        for (int bc = max_bc; bc >= (carry ? a.B : 1); --bc) {
          const size_t x = align16(4 * static_cast<size_t>(bc) * p.Kx);
          const size_t h = align16(4 * static_cast<size_t>(bc) * a.P);
          const size_t pre = align16(4 * static_cast<size_t>(bc) * C);
          const size_t region =
              std::max(x + h + 2 * pre, sampling ? p.samp_slot * want_bs : 0);
          const size_t carried =
              carry ? align16(4 * static_cast<size_t>(a.L) * a.B * C) : 0;
          p.off_toks = 0;
          p.off_partial = align16(8 * static_cast<size_t>(a.B));
          p.off_x = p.off_partial + align16(sizeof(float) * kPartial);
          p.off_h = p.off_x + x;
          p.off_pre_i = p.off_h + h;
          p.off_pre_h = p.off_pre_i + pre;
          p.off_samp = p.off_x;
          p.off_carry = p.off_x + region;  // not overlaid: carried across the sampling
          p.off_weights = p.off_carry + carried;
          p.off_head = p.off_weights + weights;
          p.smem = resident ? p.off_head + head : p.off_weights;
          if (p.smem <= budget) {
            p.Bc = bc;
            p.resident = resident;
            p.carry = carry;
            p.Bs = sampling ? static_cast<int>(
                                  std::min<size_t>(all_warps, region / p.samp_slot))
                            : 0;
            return p;
          }
        }
      }
    }
  }
  throw std::invalid_argument(
      "rnnkern._cuda: generation does not fit in shared memory even with the weights in L2 "
      "(B = " + std::to_string(a.B) + " streams, a vocabulary of " + std::to_string(a.V) +
      " needs " + std::to_string(p.samp_slot) + " bytes per sampled stream, budget " +
      std::to_string(budget) + " bytes); use Decoder(..., backend=\"triton\")");
}

using GenKernel = void (*)(GenerateArgs, GenPlan);

template <typename W>
GenKernel pick_generate(int cell, bool proj) {
  switch (cell) {
    case kLSTM: return proj ? &generate_kernel<W, kLSTM, true> : &generate_kernel<W, kLSTM, false>;
    case kGRU: return &generate_kernel<W, kGRU, false>;
    case kRNNTanh: return &generate_kernel<W, kRNNTanh, false>;
    case kRNNRelu: return &generate_kernel<W, kRNNRelu, false>;
  }
  throw std::invalid_argument("rnnkern._cuda: unknown cell code " + std::to_string(cell));
}

GenKernel generate_kernel_for(int cell, int wdtype, bool proj) {
  switch (wdtype) {
    case kFloat32: return pick_generate<float>(cell, proj);
#if RNNKERN_WITH_BF16
    case kBFloat16: return pick_generate<__nv_bfloat16>(cell, proj);
#endif
  }
  throw std::invalid_argument("rnnkern._cuda: generate weights must be float32 or bfloat16 "
                              "(and compiled into this build), got dtype code " +
                              std::to_string(wdtype));
}

void check_generate_args(const GenerateArgs& a, bool proj) {
  auto fail = [](const std::string& what) {
    throw std::invalid_argument("rnnkern._cuda generate: " + what);
  };
  if (a.cell < kLSTM || a.cell > kRNNRelu) fail("unknown cell code " + std::to_string(a.cell));
  if (a.L < 1 || a.B < 1 || a.H < 1 || a.P < 1 || a.I < 1 || a.V < 0)
    fail("L, B, I, H, P must be >= 1 and V >= 0");
  if (static_cast<int64_t>(gate_count(a.cell)) * a.H > (1 << 30) ||
      static_cast<int64_t>(a.B) * a.P > (1 << 30) || static_cast<int64_t>(a.B) * a.H > (1 << 30))
    fail("model too large for 32-bit row indices");
  if (a.proj && a.cell != kLSTM) fail("a projection is only defined for the LSTM");
  if (!proj && a.P != a.H) fail("P must equal H without an LSTM projection");
  if (a.layers == nullptr || a.h == nullptr || a.sync == nullptr) fail("null buffer");
  if (a.cell == kLSTM && a.c == nullptr) fail("the LSTM needs the cell-state buffer c");
  if (proj && a.m == nullptr) fail("the projection needs the m scratch buffer");
  if (a.feed < 1) fail("feed must be >= 1");
  if (a.table != nullptr ? a.prime == nullptr : (a.x == nullptr || a.feed != 1))
    fail("inputs: token ids with a table, or x for exactly one step without one");
  if (a.V > 0 && (a.head_w == nullptr || a.logits == nullptr)) fail("head without buffers");
  if (a.steps < 0) fail("steps must be >= 0");
  if (a.steps > 0 &&
      (a.table == nullptr || a.V == 0 || a.V > a.vocab_in || a.out == nullptr))
    fail("sampling needs a token table, a head with V <= vocab_in and an output buffer");
  if (a.steps > 0 && !(a.temperature > 0.0 && a.temperature <= DBL_MAX))
    fail("temperature must be a finite number > 0");
  if (a.steps > 0 && !(a.top_p > 0.0 && a.top_p <= 1.0)) fail("top_p must be in (0, 1]");
  if (a.top_k < 0) fail("top_k must be >= 0");
  if (a.spin_sleep_ns < 0 || a.spin_sleep_ns > 1000000)
    fail("spin_sleep_ns must be in [0, 1000000]");
  if (a.flags) {
    const uint64_t tags = (static_cast<uint64_t>(a.feed) + std::max(a.steps - 1, 0)) *
                          (2 * static_cast<uint64_t>(a.L) + 1);
    if (a.tag_base < 1 || a.tag_base + tags > (1ULL << 32))
      fail("flags mode: tags tag_base .. tag_base + " + std::to_string(tags) +
           " must lie in [1, 2^32)");
    if (a.xh == nullptr || (proj && a.xm == nullptr) || (a.V > 0 && a.xl == nullptr))
      fail("flags mode needs the exchange buffers xh (and xm with a projection, xl with a head)");
  }
}

struct Prepared {
  GenKernel kernel;
  GenPlan plan;
};

Prepared prepare(const GenerateArgs& a) {
  const bool proj = a.cell == kLSTM && a.proj != 0;
  check_generate_args(a, proj);
  const DeviceInfo dev = current_device();
  const GenKernel kernel = generate_kernel_for(a.cell, a.wdtype, proj);
  const void* k = reinterpret_cast<const void*>(kernel);
  const size_t budget = dynamic_smem_budget(k, dev, "cudaFuncGetAttributes(generate)");
  GenPlan p = make_generate_plan(a, proj, dev.sms, budget);
  allow_cooperative(k, p.blocks, p.smem, dev, "generate");
  return Prepared{kernel, p};
}

GenerateInfo info_of(const GenPlan& p) {
  return GenerateInfo{p.blocks, kThreads, p.Hb, p.Pb, p.Vb, p.Bc, p.Bs, p.resident, p.flags,
                      p.carry, static_cast<int64_t>(p.smem)};
}

}  // namespace

int64_t generate(const GenerateArgs& a, void* stream, int64_t timeout_ns, bool debug,
                 GenerateInfo* info) {
  Prepared pr = prepare(a);
  pr.plan.timeout_ns = timeout_ns;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  check(cudaGetLastError(), "a CUDA call before the rnnkern generate launch");
  check(cudaMemsetAsync(a.sync, 0, sizeof(unsigned long long), s), "cudaMemsetAsync(sync)");
  check(launch_cooperative(pr.kernel, pr.plan.blocks, pr.plan.smem, s, a, pr.plan),
        "cudaLaunchCooperativeKernel(generate)");
  check(cudaGetLastError(), "generate launch");
  if (debug) check(cudaStreamSynchronize(s), "generate (debug synchronise)");
  if (info) *info = info_of(pr.plan);
  return a.feed + (a.steps > 0 ? a.steps - 1 : 0);
}

GenerateInfo plan_generate_on(const GenerateArgs& a, int sms, int64_t smem_budget) {
  const bool proj = a.cell == kLSTM && a.proj != 0;
  check_generate_args(a, proj);
  generate_kernel_for(a.cell, a.wdtype, proj);  // the weight dtype is compiled in
  if (sms < 1 || smem_budget < 1)
    throw std::invalid_argument("rnnkern._cuda: sms and smem_budget must be >= 1");
  return info_of(make_generate_plan(a, proj, sms, static_cast<size_t>(smem_budget)));
}

}  // namespace rnnkern_cuda
