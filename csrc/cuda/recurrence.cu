// Persistent cooperative CUDA kernels for one recurrent layer, one direction: LSTM (with or
// without projection), GRU, Elman RNN (tanh / relu); forward and backward through time.
//
// Legend for shapes: T time, B batch, H hidden, P state size (proj_size or H), G gates.
//
// Work split. One launch runs all T steps. The grid has at most one block per SM (cooperative
// launch, so every block is resident and a grid-wide barrier cannot deadlock). The blocks form
// U unit groups x S batch groups (block k: unit group k / S, batch group k % S). Unit group u
// owns hidden units [u*Hb, (u+1)*Hb) with all G of their gates, and state units
// [u*Pb, (u+1)*Pb) (the same range when there is no projection); batch group g owns batch
// rows [g*Bg, (g+1)*Bg). Its slice of the recurrent weights is copied to shared memory once and
// stays there for all steps when it fits ("resident"); otherwise it is read from global memory
// every step, where it lives in L2 after the first step.
//
// Why split the batch: every block stages, each step, the rows it multiplies by its weight
// slice, i.e. all of h_{s-1} for its batch rows (forward) or all of dpre (backward, G*H
// values per row). Without a batch split that is the whole batch for every block: at B = 64,
// H = 1024 the backward staged 1 MB per block per step, 128 MB of L2 reads per step over 128
// blocks (0.24x cuDNN measured, H100). S batch groups divide those reads by S and multiply the
// weight slice by S; make_plan picks the split with the fewest bytes read per block and step
// (B <= 16, the measured winning regime, is never split; RNNKERN_CUDA_BATCH_SPLIT=off or a
// number overrides it). The batch groups never need each other's values, so each has a grid
// barrier of its own among its U blocks (status words: api.h).
//
// Per step (forward, no projection): stage h_{s-1} in shared memory a batch chunk at a time,
// compute the block's G*Hb pre-activations for the chunk, apply the cell, write h_s for the
// block's units, then one grid barrier (everybody needs all of h_s for the next step).
// With projection a second phase computes h_s = W_hr m_s for the block's state units, so two
// barriers per step. The backward is the mirror image: the pointwise part needs only the
// block's own units of dh (one barrier after it: dh_{s-1} = dpre W_hh needs all of dpre), plus
// one more barrier with projection (dm = W_hrᵀ dh needs all of dh).
//
// States and accumulation are float32 for every input dtype; weights stay in the input dtype
// (half the shared memory for 16-bit inputs) and are converted on load.
//
// The matvec (device_common.cuh) runs on float32 FMAs in register tiles, or, for bfloat16
// with at least kMmaMinRows rows per batch group, on the tensor cores (mma.sync m16n8k16,
// float32 accumulation), which rounds the staged h or dpre to bfloat16 (it is staged as
// bfloat16, and dpre is stored so); the float16 forward likewise (h staged as float16);
// float32 takes the tensor cores too (mma.sync m16n8k8, operands rounded to TF32) only where
// the caller allows TF32. Why: at B = 64, H = 1024 an
// H100 block's forward matvec is 64 x 32 x 1024 = 2M FMAs a step, 16K cycles of its SM's 128
// float32 lanes (about 9 us; as much again in the backward), where the SM's tensor cores take
// a quarter to an eighth of that (one bfloat16 mma instruction is 2K multiply-adds, a TF32 one
// 1K). Unmeasured on a GPU so far: the cuda_train benchmark's "fma matvec" rows compare the
// two, and its "float32 TF32" cases time TF32 against cuDNN's.

#include <string>
#include <vector>

#include "device_common.cuh"

namespace rnnkern_cuda {
namespace {

// Batch rows staged in shared memory at a time (at most): every chunk costs a round of
// staging, matvec and cell update with a block synchronisation between each, so larger is
// better as long as the shared memory holds it (make_plan shrinks it to fit).
constexpr int kMaxBatchChunk = 64;

// Dynamic shared memory of one block, the same arithmetic on host and device:
//   x       [Bc][K] float  staged activations (h, m, dht or dpre rows of the batch chunk);
//           for the mma matvec bfloat16 (x_size 2), rows padded to mma_stride, K being the
//           largest stride
//   pre     [Bc][C] float  the block's matvec results for the chunk
//   partial [partial] float  split-K partial sums of the tiled and mma matvecs (Plan::partial)
//   own     own_elems float  backward, when it fits (Plan::own_smem): the running dh of the
//           block's rows and state units [Bg][Pb] (phase B writes it, the next step's phases
//           0 / A read it), then the running dc (LSTM) or dh_total * z (GRU) of its rows and
//           units [Bg][Hb] (phase A writes it, phase B / the next phase A read it): values
//           only this block uses, kept off the global-memory round trip; else they live in
//           dh0, dc0, dloc; forward: none
//   w       w_elems  dtype resident recurrent weight slice (only when resident)
//   wr      wr_elems dtype resident projection weight slice (only when resident)

struct SmemLayout {
  size_t x, pre, partial, own, w, wr, total;
};

__host__ __device__ inline SmemLayout smem_layout(int K, int Bc, int C, int partial,
                                                  size_t own_elems, size_t w_elems,
                                                  size_t wr_elems, int elem_size, bool resident,
                                                  int x_size) {
  SmemLayout l;
  l.x = 0;
  l.pre = align16(static_cast<size_t>(x_size) * Bc * K);
  l.partial = l.pre + align16(sizeof(float) * size_t(Bc) * C);
  l.own = l.partial + align16(sizeof(float) * partial);
  l.w = l.own + align16(sizeof(float) * own_elems);
  l.wr = l.w + (resident ? align16(elem_size * w_elems) : 0);
  l.total = l.wr + (resident ? align16(elem_size * wr_elems) : 0);
  return l;
}

// Everything a kernel needs besides the arguments: the work split and shared-memory plan.
struct Plan {
  int blocks;    // unit groups x bsplit
  int bsplit;    // batch groups
  int Bg;        // batch rows per group (the last group may have fewer)
  int Hb;        // hidden units per block
  int Pb;        // state units per block
  int Bc;        // batch chunk
  int resident;  // weights in shared memory
  int K, C;      // shared-memory layout parameters (see smem_layout)
  int matvec;    // kMatvecTiled, kMatvecMma or kMatvecSimple (device_common.cuh)
  int partial;   // floats of the split-K buffer (kPartial; kPartialMma when it fits)
  // Shared-memory row strides of P-, H- and G*H-long rows (staged rows and resident weights):
  // the lengths themselves, padded to mma_stride for the mma matvec. In the plan rather than
  // computed in the kernels, where every live register counts (the bf16 LSTM backward spilled
  // 20 bytes on sm_90 with them computed there).
  int ld_p, ld_h, ld_gh;
  int own_smem;  // backward: the running dh / dc (or dh_total * z) in shared memory
  size_t own_elems, w_elems, wr_elems;
  size_t smem;
  long long timeout_ns;
};

// Bytes of a staged x element for weights of elem_size bytes: bfloat16 for the bfloat16 mma
// matvec (block_matvec_mma), else float (the FMA matvecs, and TF32, which rounds on load).
__host__ __device__ inline int x_size(const Plan& p, int elem_size) {
  return p.matvec == kMatvecMma && elem_size == 2 ? 2 : 4;
}

// Whether plan p stages x in the 16-bit weight type T (the mma plans of bfloat16 weights, and
// of float16 ones in the forward; the bfloat16 backward also stores dpre so); a compile-time
// false for float32 weights, whose kernels carry no 16-bit staging.
template <typename T>
__device__ __forceinline__ bool staged_16(const Plan& p) {
  if constexpr (sizeof(T) == 2) return p.matvec == kMatvecMma;
  return false;
}

// The shared-memory layout of plan p for weights of elem_size bytes (make_plan sizes it, the
// kernels find their regions in it).
__host__ __device__ inline SmemLayout plan_layout(const Plan& p, int elem_size) {
  return smem_layout(p.K, p.Bc, p.C, p.partial, p.own_elems, p.w_elems, p.wr_elems, elem_size,
                     p.resident, x_size(p, elem_size));
}

// Stages rows [b0, b0 + nb) of src [B][K] (float, or bfloat16 dpre) into x_s at row stride ld:
// as float, or in the 16-bit type X when x16 (the 16-bit mma plans; the staging rounds).
template <typename X, typename S>
__device__ __forceinline__ void stage_x(float* x_s, bool x16, int ld, const S* src, int b0,
                                        int nb, int K) {
  if constexpr (sizeof(X) == 2) {
    if (x16) {
      stage_rows(reinterpret_cast<X*>(x_s), ld, src, b0, nb, K);
      return;
    }
  }
  stage_rows(x_s, ld, src, b0, nb, K);
}

// ---------------------------------------------------------------------------------------------
// Valid length of batch element b (lengths checked: a value outside [1, T] is recorded as an
// error and clamped, so indexing stays in bounds).
__device__ __forceinline__ int length_of(const int64_t* lengths, int b, int T,
                                         unsigned long long* error) {
  if (lengths == nullptr) return T;
  const int64_t len = lengths[b];
  if (len < 1 || len > T) {
    atomicCAS(error, 0ULL, static_cast<unsigned long long>(kErrBadLength));
    return len < 1 ? 1 : T;
  }
  return static_cast<int>(len);
}

// Time index of processing step s of an element of length len: s itself going forward and at
// steps past the length (where outputs are zero and gradients pass through), len-1-s reversed.
__device__ __forceinline__ int time_of(int s, int len, int reverse) {
  return (reverse && s < len) ? len - 1 - s : s;
}

// What the calling block owns: hidden units [j0, j0 + nj), state units [p0, p0 + np) (of its
// unit group) and batch rows [r0, r1), nr of them (of its batch group).
struct BlockSlice {
  int j0, nj, p0, np, r0, r1, nr;
};

__device__ __forceinline__ BlockSlice block_slice(const Plan& plan, int B, int H, int P) {
  const int unit_group = blockIdx.x / plan.bsplit;
  BlockSlice sl;
  sl.j0 = unit_group * plan.Hb;
  sl.nj = max(0, min(H, sl.j0 + plan.Hb) - sl.j0);
  sl.p0 = unit_group * plan.Pb;
  sl.np = max(0, min(P, sl.p0 + plan.Pb) - sl.p0);
  sl.r0 = (blockIdx.x % plan.bsplit) * plan.Bg;
  sl.r1 = min(B, sl.r0 + plan.Bg);
  sl.nr = max(0, sl.r1 - sl.r0);
  return sl;
}

// The barrier of the calling block's batch group: its U = gridDim.x / bsplit blocks (block k
// is in group k % bsplit), counting on the group's arrival word (api.h: kTrainSyncWords).
__device__ __forceinline__ GridBarrier group_barrier(unsigned long long* sync, const Plan& plan) {
  const int group = blockIdx.x % plan.bsplit;
  unsigned long long* arrivals = group == 0 ? sync : sync + 1 + group;
  return GridBarrier{arrivals, sync + 1, gridDim.x / plan.bsplit, 0, plan.timeout_ns};
}

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------

template <typename T, int CELL>
__global__ void __launch_bounds__(kThreads, 1) layer_forward_kernel(ForwardArgs a, Plan plan) {
  constexpr int G = gate_count(CELL);
  RNNKERN_DYNAMIC_SMEM(smem);
  const int T_ = a.T, B = a.B, H = a.H, P = a.P, GH = G * H;
  const bool proj = CELL == kLSTM && a.w_hr != nullptr;
  const int Hb = plan.Hb, Bc = plan.Bc;
  const BlockSlice sl = block_slice(plan, B, H, P);
  const int j0 = sl.j0, nj = sl.nj, p0 = sl.p0, np = sl.np, r0 = sl.r0, r1 = sl.r1, nr = sl.nr;
  const SmemLayout L = plan_layout(plan, sizeof(T));
  float* x_s = reinterpret_cast<float*>(smem + L.x);    // [Bc][K] (T when x16)
  const bool x16 = staged_16<T>(plan);
  float* pre_s = reinterpret_cast<float*>(smem + L.pre);  // [Bc][G*Hb]
  float* part_s = reinterpret_cast<float*>(smem + L.partial);  // [plan.partial] split-K sums
  const T* gx = static_cast<const T*>(a.gx);
  const T* b_hh = static_cast<const T*>(a.b_hh);
  T* y = static_cast<T*>(a.y);
  GridBarrier bar = group_barrier(a.sync, plan);

  // W_hh rows of the block: gate g, unit jj -> row g*H + j0 + jj of w_hh [G*H, P].
  Rows<T> w{static_cast<const T*>(a.w_hh) + static_cast<size_t>(j0) * P,
            static_cast<long long>(H) * P, max(nj, 1), P};
  // W_hr rows of the block's state units: p0 + pp of w_hr [P, H].
  Rows<T> wr{static_cast<const T*>(a.w_hr) + static_cast<size_t>(p0) * H, 0, max(np, 1), H};
  const int ldp = plan.ld_p, ldh = plan.ld_h;  // shared-memory row strides (Plan)
  if (plan.resident) {
    T* w_s = reinterpret_cast<T*>(smem + L.w);  // [G][nj][ldp]
    stage_weights(w_s, w, G * nj, ldp);
    w = Rows<T>{w_s, static_cast<long long>(nj) * ldp, max(nj, 1), ldp};
    if (proj) {
      T* wr_s = reinterpret_cast<T*>(smem + L.wr);  // [np][ldh]
      stage_weights(wr_s, wr, np, ldh);
      wr = Rows<T>{wr_s, 0, max(np, 1), ldh};
    }
  }

  // State slots: with save, hs / aux are the saved sequences; without, 2-slot rings.
  auto h_slot = [&](int s) { return a.hs + static_cast<size_t>(a.save ? s : (s & 1)) * B * P; };
  auto c_slot = [&](int s) { return a.aux + static_cast<size_t>(a.save ? s : (s & 1)) * B * H; };
  if (a.save) {  // slot 0 of the saved sequences is the initial state (own units and rows)
    for (int i = threadIdx.x; i < nr * np; i += kThreads)
      a.hs[(r0 + i / np) * P + p0 + i % np] = a.h0[(r0 + i / np) * P + p0 + i % np];
    if (CELL == kLSTM)
      for (int i = threadIdx.x; i < nr * nj; i += kThreads)
        a.aux[(r0 + i / nj) * H + j0 + i % nj] = a.c0[(r0 + i / nj) * H + j0 + i % nj];
  }
  __syncthreads();

  for (int s = 0; s < T_; ++s) {
    trace_point(a.trace, a.trace_steps, s, 0);
    const float* hp = s == 0 ? a.h0 : h_slot(s);  // [B, P] h_{s-1}, all units (other blocks')
    float* hn = h_slot(s + 1);                    // [B, P] h_s: this block writes its units
    const float* cp = CELL == kLSTM ? (s == 0 ? a.c0 : c_slot(s)) : nullptr;  // [B, H]
    float* cn = CELL == kLSTM ? c_slot(s + 1) : nullptr;                      // [B, H]

    // Phase A: gates of the block's hidden units.
    if (nj > 0) {
      for (int b0 = r0; b0 < r1; b0 += Bc) {
        const int nb = min(Bc, r1 - b0);
        // Prefetch the inputs of this thread's first cell update that do not depend on the
        // matvec (its gx row and, for the LSTM, c_{s-1}, which this block wrote), so their
        // global-memory latency overlaps the staging and the matvec.
        float pf_gx[G];
        float pf_c = 0.f;
        if (threadIdx.x < nb * nj) {
          const int b = b0 + threadIdx.x / nj, j = j0 + threadIdx.x % nj;
          const int t = time_of(s, length_of(a.lengths, b, T_, bar.error), a.reverse);
          const T* gxr = gx + (static_cast<size_t>(t) * B + b) * GH;
#pragma unroll
          for (int g = 0; g < G; ++g) pf_gx[g] = to_float(gxr[g * H + j]);
          if (CELL == kLSTM) pf_c = __ldcg(cp + static_cast<size_t>(b) * H + j);
        }
        stage_x<T>(x_s, x16, ldp, hp, b0, nb, P);
        __syncthreads();
        if (b0 == r0) trace_point(a.trace, a.trace_steps, s, 1);
        matvec<T>(plan.matvec, x_s, ldp, nb, P, G * nj, w, part_s, plan.partial,
                  [&](int bb, int r, float v) { pre_s[bb * plan.C + (r / nj) * Hb + r % nj] = v; });
        __syncthreads();
        if (b0 == r0) trace_point(a.trace, a.trace_steps, s, 2);
        for (int i = threadIdx.x; i < nb * nj; i += kThreads) {
          const int bb = i / nj, jj = i % nj, b = b0 + bb, j = j0 + jj;
          const int len = length_of(a.lengths, b, T_, bar.error);
          const bool valid = s < len;
          const int t = time_of(s, len, a.reverse);
          const float* pr = pre_s + bb * plan.C + jj;
          float* gates = a.save && a.gates ? a.gates + (static_cast<size_t>(s) * B + b) * GH
                                           : nullptr;
          float gxv[G];  // gx of this time step per gate
          float c_prev = 0.f;
          if (i == static_cast<int>(threadIdx.x)) {  // the prefetched item
#pragma unroll
            for (int g = 0; g < G; ++g) gxv[g] = pf_gx[g];
            c_prev = pf_c;
          } else {
            const T* gxr = gx + (static_cast<size_t>(t) * B + b) * GH;
#pragma unroll
            for (int g = 0; g < G; ++g) gxv[g] = to_float(gxr[g * H + j]);
            if (CELL == kLSTM) c_prev = __ldcg(cp + static_cast<size_t>(b) * H + j);
          }
          float gh[G];  // W_hh h + b_hh per gate
#pragma unroll
          for (int g = 0; g < G; ++g)
            gh[g] = pr[g * Hb] + (b_hh ? to_float(b_hh[g * H + j]) : 0.f);
          // h_prev: the staged copy of h_{s-1} (no projection here, so P == H).
          const float h_prev = proj  ? 0.f
                               : x16 ? __ldcg(hp + static_cast<size_t>(b) * P + j)  // x_s: 16-bit
                                     : x_s[bb * ldp + j];
          const CellStep<CELL> cs = cell_step<CELL>(gxv, gh, c_prev, h_prev);
          if (gates) {
#pragma unroll
            for (int g = 0; g < G; ++g) gates[g * H + j] = cs.gate[g];
          }
          if (CELL == kLSTM) {
            cn[static_cast<size_t>(b) * H + j] = valid ? cs.c : c_prev;
            if (proj) {
              a.m[static_cast<size_t>(b) * H + j] = cs.h;
              continue;
            }
          }
          if (CELL == kGRU && gates) a.aux[(static_cast<size_t>(s) * B + b) * H + j] = gh[2];
          hn[static_cast<size_t>(b) * P + j] = valid ? cs.h : h_prev;
          y[(static_cast<size_t>(t) * B + b) * P + j] = from_float<T>(valid ? cs.h : 0.f);
        }
        __syncthreads();  // x_s / pre_s are reused by the next chunk
      }
    }
    trace_point(a.trace, a.trace_steps, s, 3);

    // Phase B (projection): h_s = W_hr m_s for the block's state units; needs all of m_s.
    if (proj) {
      if (!bar.wait()) return;
      trace_point(a.trace, a.trace_steps, s, 4);
      if (np > 0) {
        for (int b0 = r0; b0 < r1; b0 += Bc) {
          const int nb = min(Bc, r1 - b0);
          stage_x<T>(x_s, x16, ldh, a.m, b0, nb, H);
          __syncthreads();
          matvec<T>(plan.matvec, x_s, ldh, nb, H, np, wr, part_s, plan.partial,
                    [&](int bb, int pp, float v) {
            const int b = b0 + bb, p = p0 + pp;
            const int len = length_of(a.lengths, b, T_, bar.error);
            const bool valid = s < len;
            const int t = time_of(s, len, a.reverse);
            const float h_prev = __ldcg(hp + static_cast<size_t>(b) * P + p);
            hn[static_cast<size_t>(b) * P + p] = valid ? v : h_prev;
            y[(static_cast<size_t>(t) * B + b) * P + p] = from_float<T>(valid ? v : 0.f);
          });
          __syncthreads();
        }
      }
      trace_point(a.trace, a.trace_steps, s, 5);
    }
    if (!bar.wait()) return;  // h_s complete before anyone reads it in step s+1
  }

  // Final state: the block's own units and rows of the last slot (written by this block).
  const float* hT = h_slot(T_);
  for (int i = threadIdx.x; i < nr * np; i += kThreads)
    a.h_n[(r0 + i / np) * P + p0 + i % np] = __ldcg(hT + (r0 + i / np) * P + p0 + i % np);
  if (CELL == kLSTM) {
    const float* cT = c_slot(T_);
    for (int i = threadIdx.x; i < nr * nj; i += kThreads)
      a.c_n[(r0 + i / nj) * H + j0 + i % nj] = __ldcg(cT + (r0 + i / nj) * H + j0 + i % nj);
  }
}

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------

// What the pointwise gradient of one (row b, unit j) at processing step s reads from the
// forward's saved tensors and from dy: LSTM gates i, f, g, o, a0 = c_{s-1}, a1 = c_s; GRU
// gates r, z, n, a0 = h_{s-1}, a1 = W_hn h + b_hn; RNN a0 = h_s; dy_t (unused with a
// projection, whose dy enters in phase 0). None of it depends on other blocks or on the
// running gradients, so the kernel loads a step's items before the previous step's barrier.
struct SavedItem {
  float gate[4];
  float a0, a1;
  float dy;
};

template <typename T, int CELL>
__device__ __forceinline__ SavedItem load_saved_item(const BackwardArgs& a, int s, int t, int b,
                                                     int j, bool proj) {
  constexpr int G = gate_count(CELL);
  const int B = a.B, H = a.H, P = a.P;
  const size_t row = static_cast<size_t>(s) * B + b;  // processing-order row
  SavedItem it{};
  if (CELL == kLSTM || CELL == kGRU) {
    const float* gt = a.gates + row * G * H;
#pragma unroll
    for (int g = 0; g < G; ++g) it.gate[g] = gt[g * H + j];
  }
  if (CELL == kLSTM) {
    const size_t bh = static_cast<size_t>(b) * H + j;
    it.a0 = a.aux[static_cast<size_t>(s) * B * H + bh];
    it.a1 = a.aux[static_cast<size_t>(s + 1) * B * H + bh];
  } else if (CELL == kGRU) {
    it.a0 = a.hs[row * P + j];
    it.a1 = a.aux[row * H + j];
  } else {
    it.a0 = a.hs[(row + B) * P + j];  // hs[s + 1][b][j]
  }
  if (!proj)
    it.dy = to_float(static_cast<const T*>(a.dy)[(static_cast<size_t>(t) * B + b) * P + j]);
  return it;
}

// This step's dpre slot [B][G*H]: float32, or, in the bfloat16 mma plans, bfloat16 in the same
// buffer. Those plans stage dpre as bfloat16 for the product anyway, so storing it rounded
// changes no result and halves the bytes every block of the batch group stages from L2 each
// step (the B = 64 backward's bottleneck before the batch split: 1 MB per block at H = 1024).
struct DpreSlot {
  float* f;           // float32 rows
  __nv_bfloat16* h;   // bfloat16 rows (bfloat16 mma plans), else null
  __device__ __forceinline__ void put(size_t i, float v) const {
#if RNNKERN_WITH_BF16
    if (h != nullptr) {
      h[i] = __float2bfloat16_rn(v);
      return;
    }
#endif
    f[i] = v;
  }
  // Into x_s: bfloat16 rows from the bfloat16 slot (the bfloat16 mma plans, the only ones
  // that have it), float rows from the float32 one.
  __device__ __forceinline__ void stage(float* x_s, int ld, int b0, int nb, int GH) const {
#if RNNKERN_WITH_BF16
    if (h != nullptr) {
      stage_rows(reinterpret_cast<__nv_bfloat16*>(x_s), ld, h, b0, nb, GH);
      return;
    }
#endif
    stage_rows(x_s, ld, f, b0, nb, GH);
  }
};

template <typename T, int CELL>
__global__ void __launch_bounds__(kThreads, 1) layer_backward_kernel(BackwardArgs a, Plan plan) {
  constexpr int G = gate_count(CELL);
  RNNKERN_DYNAMIC_SMEM(smem);
  const int T_ = a.T, B = a.B, H = a.H, P = a.P, GH = G * H;
  const bool proj = CELL == kLSTM && a.wr_t != nullptr;
  const int Hb = plan.Hb, Pb = plan.Pb, Bc = plan.Bc;
  const BlockSlice sl = block_slice(plan, B, H, P);
  const int j0 = sl.j0, nj = sl.nj, p0 = sl.p0, np = sl.np, r0 = sl.r0, r1 = sl.r1, nr = sl.nr;
  const SmemLayout L = plan_layout(plan, sizeof(T));
  float* x_s = reinterpret_cast<float*>(smem + L.x);      // [Bc][K] (bfloat16 when x16)
  // (float16 backward plans never take the mma matvec: make_plan)
  const bool x16 = std::is_same<T, __nv_bfloat16>::value && staged_16<T>(plan);
  float* pre_s = reinterpret_cast<float*>(smem + L.pre);  // [Bc][Hb] dm (projection)
  float* part_s = reinterpret_cast<float*>(smem + L.partial);  // [plan.partial] split-K sums
  const T* dy = static_cast<const T*>(a.dy);
  GridBarrier bar = group_barrier(a.sync, plan);

  // Rows of W_hhᵀ [P, G*H] for the block's state units; rows of W_hrᵀ [H, P] for its units.
  Rows<T> wt{static_cast<const T*>(a.w_t) + static_cast<size_t>(p0) * GH, 0, max(np, 1), GH};
  Rows<T> wr{static_cast<const T*>(a.wr_t) + static_cast<size_t>(j0) * P, 0, max(nj, 1), P};
  const int ldg = plan.ld_gh, ldp = plan.ld_p;  // shared-memory row strides (Plan)
  if (plan.resident) {
    T* wt_s = reinterpret_cast<T*>(smem + L.w);  // [np][ldg]
    stage_weights(wt_s, wt, np, ldg);
    wt = Rows<T>{wt_s, 0, max(np, 1), ldg};
    if (proj) {
      T* wr_s = reinterpret_cast<T*>(smem + L.wr);  // [nj][ldp]
      stage_weights(wr_s, wr, nj, ldp);
      wr = Rows<T>{wr_s, 0, max(nj, 1), ldp};
    }
  }

  // The running gradients of the block's rows: dh of its state units (dh_s) and, of its
  // hidden units, the LSTM's dc or the GRU's dh_total * z (unit_s), in shared memory when the
  // plan has room (then written to dh0 / dc0 at the end), else in dh0, dc0, dloc. Element
  // (b, p) is dh_s[(b - r0) * ld_dh + p - p0], (b, j) is unit_s[(b - r0) * ld_unit + j - j0].
  const bool own = plan.own_smem != 0;
  const int ld_dh = own ? Pb : P, ld_unit = own ? Hb : H;
  float* dh_s = own ? reinterpret_cast<float*>(smem + L.own)
                    : a.dh0 + static_cast<size_t>(r0) * P + p0;
  float* unit_s = own ? dh_s + static_cast<size_t>(plan.Bg) * Pb
                      : (CELL == kLSTM  ? a.dc0 + static_cast<size_t>(r0) * H + j0
                         : CELL == kGRU ? a.dloc + static_cast<size_t>(r0) * H + j0
                                        : nullptr);
  for (int i = threadIdx.x; i < nr * np; i += kThreads)
    dh_s[(i / np) * ld_dh + i % np] = a.dh_n[(r0 + i / np) * P + p0 + i % np];
  if (CELL == kLSTM)
    for (int i = threadIdx.x; i < nr * nj; i += kThreads)
      unit_s[(i / nj) * ld_unit + i % nj] = a.dc_n[(r0 + i / nj) * H + j0 + i % nj];
  __syncthreads();

  SavedItem pf{};       // this thread's first item of step `prefetched` (see below)
  int prefetched = -1;
  for (int s = T_ - 1; s >= 0; --s) {
    const int ps = T_ - 1 - s;  // processing step (for the trace)
    trace_point(a.trace, a.trace_steps, ps, 0);
    const size_t slot = static_cast<size_t>(s & 1) * B * GH;
    const DpreSlot dpre{a.dpre + slot,
                        x16 ? reinterpret_cast<__nv_bfloat16*>(a.dpre) + slot : nullptr};

    // Phase 0 (projection): dh_total = dh + dy_t for the block's state units, shared with all.
    if (proj) {
      for (int i = threadIdx.x; i < nr * np; i += kThreads) {
        const int b = r0 + i / np, p = p0 + i % np;
        const int len = length_of(a.lengths, b, T_, bar.error);
        const int t = time_of(s, len, a.reverse);
        const float v = dh_s[(b - r0) * ld_dh + (p - p0)] +
                        to_float(dy[(static_cast<size_t>(t) * B + b) * P + p]);
        a.dht[static_cast<size_t>(b) * P + p] = v;
        a.dh_proj[(static_cast<size_t>(t) * B + b) * P + p] = s < len ? v : 0.f;
      }
      if (!bar.wait()) return;
      trace_point(a.trace, a.trace_steps, ps, 1);
    }

    // Phase A: pointwise gradients of the block's hidden units -> dgx, dpre (and dgh, unit_s).
    if (nj > 0) {
      for (int b0 = r0; b0 < r1; b0 += Bc) {
        const int nb = min(Bc, r1 - b0);
        if (proj) {  // dm = dh_total W_hr for the block's units: needs all of dht
          stage_x<T>(x_s, x16, ldp, a.dht, b0, nb, P);
          __syncthreads();
          matvec<T>(plan.matvec, x_s, ldp, nb, P, nj, wr, part_s, plan.partial,
                    [&](int bb, int jj, float v) { pre_s[bb * plan.C + jj] = v; });
          __syncthreads();
        }
        for (int i = threadIdx.x; i < nb * nj; i += kThreads) {
          const int bb = i / nj, jj = i % nj, b = b0 + bb, j = j0 + jj;
          const int len = length_of(a.lengths, b, T_, bar.error);
          const bool valid = s < len;
          const int t = time_of(s, len, a.reverse);
          float* dgx = a.dgx + (static_cast<size_t>(t) * B + b) * GH;
          const size_t dp = static_cast<size_t>(b) * GH;  // row b of the dpre slot
          const SavedItem it = (prefetched == s && b0 == r0 && i == static_cast<int>(threadIdx.x))
                                   ? pf
                                   : load_saved_item<T, CELL>(a, s, t, b, j, proj);
          if (CELL == kLSTM) {
            const float dm = proj ? pre_s[bb * plan.C + jj]
                                  : dh_s[(b - r0) * ld_dh + (j - p0)] + it.dy;
            const float ig = it.gate[0], fg = it.gate[1], gg = it.gate[2], og = it.gate[3];
            const float c_prev = it.a0;
            const float tc = tanhf(it.a1);
            float& dc_run = unit_s[(b - r0) * ld_unit + jj];
            const float dc = dc_run;
            const float dc_total = dc + dm * og * (1.f - tc * tc);
            float d[4];
            d[0] = dc_total * gg * ig * (1.f - ig);
            d[1] = dc_total * c_prev * fg * (1.f - fg);
            d[2] = dc_total * ig * (1.f - gg * gg);
            d[3] = dm * tc * og * (1.f - og);
#pragma unroll
            for (int g = 0; g < 4; ++g) {
              const float v = valid ? d[g] : 0.f;
              dgx[g * H + j] = v;
              dpre.put(dp + g * H + j, v);
            }
            dc_run = valid ? dc_total * fg : dc;
          } else if (CELL == kGRU) {
            const float dh_total = dh_s[(b - r0) * ld_dh + (j - p0)] + it.dy;
            const float r = it.gate[0], z = it.gate[1], n = it.gate[2];
            const float h_prev = it.a0;
            const float hn = it.a1;
            const float dn_pre = dh_total * (1.f - z) * (1.f - n * n);
            const float dr_pre = dn_pre * hn * r * (1.f - r);
            const float dz_pre = dh_total * (h_prev - n) * z * (1.f - z);
            float* dgh = a.dgh + (static_cast<size_t>(t) * B + b) * GH;
            const float vr = valid ? dr_pre : 0.f, vz = valid ? dz_pre : 0.f;
            const float vn = valid ? dn_pre : 0.f;
            dgx[j] = vr;
            dgx[H + j] = vz;
            dgx[2 * H + j] = vn;
            dgh[j] = vr;
            dgh[H + j] = vz;
            dgh[2 * H + j] = vn * r;
            dpre.put(dp + j, vr);
            dpre.put(dp + H + j, vz);
            dpre.put(dp + 2 * H + j, vn * r);
            unit_s[(b - r0) * ld_unit + jj] = dh_total * z;
          } else {
            const float dh_total = dh_s[(b - r0) * ld_dh + (j - p0)] + it.dy;
            const float h_new = it.a0;
            const float deriv = CELL == kRNNTanh ? 1.f - h_new * h_new : (h_new > 0.f ? 1.f : 0.f);
            const float v = valid ? dh_total * deriv : 0.f;
            dgx[j] = v;
            dpre.put(dp + j, v);
          }
        }
        __syncthreads();  // x_s / pre_s are reused by the next chunk
      }
    }
    trace_point(a.trace, a.trace_steps, ps, 2);
    // Load step s-1's first item of this thread (first chunk) now: its latency overlaps the
    // barrier and phase B instead of following them.
    if (s > 0 && nj > 0 && static_cast<int>(threadIdx.x) < min(Bc, nr) * nj) {
      const int b = r0 + threadIdx.x / nj, j = j0 + threadIdx.x % nj;
      const int t = time_of(s - 1, length_of(a.lengths, b, T_, bar.error), a.reverse);
      pf = load_saved_item<T, CELL>(a, s - 1, t, b, j, proj);
      prefetched = s - 1;
    }
    if (!bar.wait()) return;  // dpre complete
    trace_point(a.trace, a.trace_steps, ps, 3);

    // Phase B: dh_{s-1} = dpre W_hh (+ dh_total * z for the GRU) for the block's state units.
    if (np > 0) {
      for (int b0 = r0; b0 < r1; b0 += Bc) {
        const int nb = min(Bc, r1 - b0);
        dpre.stage(x_s, ldg, b0, nb, GH);
        __syncthreads();
        if (b0 == r0) trace_point(a.trace, a.trace_steps, ps, 4);
        matvec<T>(plan.matvec, x_s, ldg, nb, GH, np, wt, part_s, plan.partial,
                  [&](int bb, int pp, float v) {
          const int b = b0 + bb;
          const int len = length_of(a.lengths, b, T_, bar.error);
          if (s < len)
            dh_s[(b - r0) * ld_dh + pp] =
                CELL == kGRU ? v + unit_s[(b - r0) * ld_unit + pp] : v;
          // past the length dh passes through unchanged
        });
        __syncthreads();
      }
    }
    trace_point(a.trace, a.trace_steps, ps, 5);
    // No barrier here: the next step's phases 0 / A read only this block's own dh and dc and
    // write the other dpre slot; every block passed this step's barrier before anyone can
    // reach the next one, which is when this slot is written again.
  }
  if (own) {
    for (int i = threadIdx.x; i < nr * np; i += kThreads)
      a.dh0[(r0 + i / np) * P + p0 + i % np] = dh_s[(i / np) * Pb + i % np];
    if (CELL == kLSTM)
      for (int i = threadIdx.x; i < nr * nj; i += kThreads)
        a.dc0[(r0 + i / nj) * H + j0 + i % nj] = unit_s[(i / nj) * Hb + i % nj];
  }
}

// ---------------------------------------------------------------------------------------------
// host side: plans and launches
// ---------------------------------------------------------------------------------------------

// v as a whole number >= 1, or 0 when it is not one (the planning knobs' numeric values).
long parse_count(const std::string& v) {
  char* end = nullptr;
  const long n = std::strtol(v.c_str(), &end, 10);
  return (v.empty() || *end != '\0' || n < 1) ? 0 : n;
}

// Rows per batch group at least: the tiled matvec's warp tiles are 8 batch rows, and groups of
// 16 keep every tile full at the split sizes (B = 32, 64, ...) where a split pays.
constexpr int kMinGroupRows = 16;

// Batch rows per group from which the mma matvec is the default (bfloat16; the float16
// forward; float32 with TF32 allowed): a full warp task (kMmaBatch rows); with fewer, most of
// each tensor-core tile is padding, and B < 16 on the float32 FMAs is the measured winning
// regime (1.4-2.2x cuDNN at B = 1, H100).
constexpr int kMmaMinRows = kMmaBatch;

// Why the mma matvec cannot run a layer (one direction), or "" when it can. bfloat16; float16
// in the forward (the backward would round dpre to float16, whose range flushes small
// gradients to zero; h, rounded in the forward, lies in [-1, 1] for LSTM and GRU, and torch.nn's
// float16 path holds it as a float16 tensor too); float32 when the caller allows TF32 (tf32:
// torch's float32 matmul precision is not "highest", the rule of every rnnkern kernel), else
// it stays IEEE. The wide loads need 4-element rows.
std::string mma_unfit(int dtype, bool tf32, bool backward, int H, int P, int major,
                      bool weights_aligned) {
  if (dtype == kFloat32 && !tf32)
    return "float32 products stay exact unless TF32 is allowed "
           "(torch.set_float32_matmul_precision('high'))";
  if (dtype == kFloat16 && backward)
    return "float16 gradients would lose small values rounded to float16: the float16 "
           "backward keeps the float32 FMAs";
  if (dtype != kBFloat16 && dtype != kFloat32 && dtype != kFloat16)
    return "it multiplies bfloat16, float16 or float32 (with TF32 allowed) weights only";
  if (major < 8) return "it needs compute capability 8.0 or later";
  if (H % 4 != 0 || P % 4 != 0)
    return "hidden_size and proj_size must be multiples of 4, got " + std::to_string(H) +
           " and " + std::to_string(P);
  if (!weights_aligned) return "the weight tensors must be 8-byte aligned";
  return "";
}

// The matvec of a plan with Bg rows per batch group: RNNKERN_CUDA_MATVEC = "auto" (unset: mma
// where it can run and Bg >= kMmaMinRows, else tiled), "tiled", "mma" or "simple" (the
// one-row-per-warp cross-check). Asking for mma where it cannot run is an error.
int choose_matvec(const std::string& unfit, int Bg) {
  const char* env = std::getenv("RNNKERN_CUDA_MATVEC");
  const std::string v = env ? env : "auto";
  if (v == "auto") return unfit.empty() && Bg >= kMmaMinRows ? kMatvecMma : kMatvecTiled;
  if (v == "tiled") return kMatvecTiled;
  if (v == "simple") return kMatvecSimple;
  if (v == "mma") {
    if (!unfit.empty())
      throw std::invalid_argument("rnnkern._cuda: RNNKERN_CUDA_MATVEC=mma cannot run this "
                                  "layer: " + unfit);
    return kMatvecMma;
  }
  throw std::invalid_argument("rnnkern._cuda: RNNKERN_CUDA_MATVEC must be 'auto', 'tiled', "
                              "'mma' or 'simple', got '" + v + "'");
}

// The smallest batch chunk with which a plan keeps the weights resident (capped at the group's
// rows): RNNKERN_CUDA_RESIDENT_CHUNK, default 1 (residency first, whatever chunk it leaves).
// Residency can cost chunk size: an emulated H100 plan of a float32 GRU backward at B = 64,
// H = 1024 keeps its 192 KB weight slice resident with 2-row chunks, 16 rounds of staging (an
// L2 round trip each), two block barriers and a matvec of mostly padded tiles for a group's 32
// rows every step, where streaming the slice from L2 (once per chunk) leaves 16-row chunks.
// Which is faster is unmeasured: the cuda_train benchmark times the plans this changes with
// 16 beside the default.
int resident_min_chunk(int Bg) {
  const char* env = std::getenv("RNNKERN_CUDA_RESIDENT_CHUNK");
  if (env == nullptr) return 1;
  const std::string v = env;
  const long n = parse_count(v);
  if (n == 0)
    throw std::invalid_argument("rnnkern._cuda: RNNKERN_CUDA_RESIDENT_CHUNK must be a number "
                                "of batch rows >= 1, got '" + v + "'");
  return static_cast<int>(std::min<long>(n, Bg));
}

// The work split and shared-memory plan with `bsplit` batch groups, for `sms` blocks at most
// and a shared-memory budget; false when it does not fit even with the weights in L2.
// mma_why: mma_unfit's answer for the layer.
// Forward: K = staged row length (P, or max(P, H) with projection), C = G*Hb,
//          w = G*Hb*P (W_hh rows), wr = Pb*H (W_hr rows).
// Backward: K = max(G*H, P), C = Hb, w = Pb*G*H (W_hhᵀ rows), wr = Hb*P (W_hrᵀ rows).
// With the mma matvec every row length n in these is its padded stride mma_stride(n, bytes).
bool plan_with_split(bool backward, int cell, int dtype, int B, int H, int P, bool proj, int sms,
                     size_t budget, int bsplit, const std::string& mma_why, Plan* out) {
  const int G = gate_count(cell);
  Plan p{};
  p.Bg = (B + bsplit - 1) / bsplit;
  p.bsplit = (B + p.Bg - 1) / p.Bg;  // every group has rows
  const int max_groups = std::max(1, std::min(sms / p.bsplit, std::max(H, P)));
  p.Hb = (H + max_groups - 1) / max_groups;
  const int unit_groups = (H + p.Hb - 1) / p.Hb;
  p.blocks = unit_groups * p.bsplit;
  // Without a projection the state units are the hidden units, and the backward relies on a
  // block owning the same range of both (dh and dh_total * z of its units are block-local).
  p.Pb = proj ? (P + unit_groups - 1) / unit_groups : p.Hb;
  p.matvec = choose_matvec(mma_why, p.Bg);
  // row strides in shared memory (the kernels' ld*): padded for the mma matvec
  const int es = elem_size(dtype), xs = x_size(p, es);
  const auto ld = [&](int n) { return p.matvec == kMatvecMma ? mma_stride(n, xs) : n; };
  p.ld_p = ld(P);
  p.ld_h = ld(H);
  p.ld_gh = ld(G * H);
  if (backward) {
    p.K = ld(std::max(G * H, proj ? P : 0));
    p.C = p.Hb;
    p.w_elems = static_cast<size_t>(p.Pb) * ld(G * H);
    p.wr_elems = proj ? static_cast<size_t>(p.Hb) * ld(P) : 0;
  } else {
    p.K = ld(proj ? std::max(P, H) : P);
    p.C = G * p.Hb;
    p.w_elems = static_cast<size_t>(G) * p.Hb * ld(P);
    p.wr_elems = proj ? static_cast<size_t>(p.Pb) * ld(H) : 0;
  }
  // Backward: the running values in shared memory where they fit (see smem_layout); at an
  // equal batch chunk that is preferred (a row of them is a small fraction of a staged row).
  const size_t own_elems =
      backward ? static_cast<size_t>(p.Bg) * (p.Pb + (cell == kLSTM || cell == kGRU ? p.Hb : 0))
               : 0;
  // The mma matvec's larger split-K buffer only where it costs no batch row and no residency
  // (with kPartial it splits K over fewer warps).
  const int partials[2] = {p.matvec == kMatvecMma ? kPartialMma : kPartial, kPartial};
  const int min_resident_chunk = resident_min_chunk(p.Bg);
  for (int resident = 1; resident >= 0; --resident) {
    for (int bc = std::min(p.Bg, kMaxBatchChunk); bc >= (resident ? min_resident_chunk : 1);
         --bc) {
      for (int own = own_elems > 0 ? 1 : 0; own >= 0; --own) {
        for (int partial : partials) {
          p.Bc = bc;
          p.resident = resident;
          p.own_smem = own;
          p.own_elems = own ? own_elems : 0;
          p.partial = partial;
          p.smem = plan_layout(p, es).total;
          if (p.smem <= budget) {
            *out = p;
            return true;
          }
        }
      }
    }
  }
  *out = p;  // (the last layout tried, for make_plan's error)
  return false;
}

// Bytes one block reads from global memory (L2) per step under plan p: the staged rows
// (forward: h, and m with a projection; backward: dpre, and dh with a projection), float32
// (dpre bfloat16 with the bfloat16 mma matvec: DpreSlot), plus the weight slices when they are not
// resident.
size_t step_bytes(const Plan& p, bool backward, int G, int H, int P, bool proj, int es) {
  const size_t dpre_bytes = x_size(p, es);
  const size_t row = backward ? dpre_bytes * G * H + (proj ? 4 * P : 0)
                              : 4 * (static_cast<size_t>(P) + (proj ? H : 0));
  return static_cast<size_t>(p.Bg) * row +
         (p.resident ? 0 : static_cast<size_t>(es) * (p.w_elems + p.wr_elems));
}

// Batch-group counts to consider: RNNKERN_CUDA_BATCH_SPLIT=off (1) or a number forces one;
// unset or "auto": 1 and every power of two up to sms that leaves kMinGroupRows rows a group.
std::vector<int> split_candidates(int B, int sms) {
  const char* env = std::getenv("RNNKERN_CUDA_BATCH_SPLIT");
  const std::string v = env ? env : "auto";
  if (v == "off") return {1};
  if (v != "auto") {
    const long n = parse_count(v);
    if (n == 0)
      throw std::invalid_argument("rnnkern._cuda: RNNKERN_CUDA_BATCH_SPLIT must be 'auto', "
                                  "'off' or a number of batch groups >= 1, got '" + v + "'");
    return {static_cast<int>(std::min<long>(n, std::min({B, sms, kMaxBatchGroups})))};
  }
  std::vector<int> out{1};
  for (int s = 2; s <= std::min(sms, kMaxBatchGroups) && (B + s - 1) / s >= kMinGroupRows;
       s *= 2)
    out.push_back(s);
  return out;
}

// The plan of a launch: of the candidate batch splits that fit, the one whose blocks read the
// fewest bytes per step (the lower batch split on a tie; see the top comment).
Plan make_plan(bool backward, int cell, int dtype, int B, int H, int P, bool proj, int sms,
               size_t budget, const std::string& mma_why) {
  const int G = gate_count(cell), es = elem_size(dtype);
  Plan best{}, tried{};
  bool found = false;
  size_t best_bytes = 0;
  for (int bsplit : split_candidates(B, sms)) {
    Plan p{};
    if (!plan_with_split(backward, cell, dtype, B, H, P, proj, sms, budget, bsplit, mma_why,
                         &p)) {
      tried = p;
      continue;
    }
    const size_t bytes = step_bytes(p, backward, G, H, P, proj, es);
    if (!found || bytes < best_bytes) {
      best = p;
      best_bytes = bytes;
      found = true;
    }
  }
  if (found) return best;
  throw std::invalid_argument(
      "rnnkern._cuda: this layer does not fit in shared memory even with the weights in L2 "
      "(one batch row of " + std::to_string(tried.K) + " staged values and " +
      std::to_string(tried.C) + " float32 results need " + std::to_string(tried.smem) +
      " bytes, more than the " + std::to_string(budget) + " available)");
}

using KernelFn = void (*)(void);

template <typename T>
KernelFn pick_kernel(bool backward, int cell) {
  if (backward) {
    switch (cell) {
      case kLSTM: return reinterpret_cast<KernelFn>(&layer_backward_kernel<T, kLSTM>);
      case kGRU: return reinterpret_cast<KernelFn>(&layer_backward_kernel<T, kGRU>);
      case kRNNTanh: return reinterpret_cast<KernelFn>(&layer_backward_kernel<T, kRNNTanh>);
      case kRNNRelu: return reinterpret_cast<KernelFn>(&layer_backward_kernel<T, kRNNRelu>);
    }
  } else {
    switch (cell) {
      case kLSTM: return reinterpret_cast<KernelFn>(&layer_forward_kernel<T, kLSTM>);
      case kGRU: return reinterpret_cast<KernelFn>(&layer_forward_kernel<T, kGRU>);
      case kRNNTanh: return reinterpret_cast<KernelFn>(&layer_forward_kernel<T, kRNNTanh>);
      case kRNNRelu: return reinterpret_cast<KernelFn>(&layer_forward_kernel<T, kRNNRelu>);
    }
  }
  throw std::invalid_argument("rnnkern._cuda: unknown cell code " + std::to_string(cell));
}

KernelFn kernel_for(bool backward, int cell, int dtype) {
  switch (dtype) {
    case kFloat32: return pick_kernel<float>(backward, cell);
#if RNNKERN_WITH_F16
    case kFloat16: return pick_kernel<__half>(backward, cell);
#endif
#if RNNKERN_WITH_BF16
    case kBFloat16: return pick_kernel<__nv_bfloat16>(backward, cell);
#endif
  }
  throw std::invalid_argument("rnnkern._cuda: dtype code " + std::to_string(dtype) +
                              " is not compiled into this build");
}

void check_shape(int cell, int T, int B, int H, int P) {
  if (cell < kLSTM || cell > kRNNRelu)
    throw std::invalid_argument("rnnkern._cuda: unknown cell code " + std::to_string(cell));
  if (T < 1 || B < 1 || H < 1 || P < 1)
    throw std::invalid_argument("rnnkern._cuda: T, B, H, P must be >= 1");
  // Offsets are size_t, but per-row indices are int: keep every dimension product in range.
  if (static_cast<int64_t>(gate_count(cell)) * H > (1 << 30) || static_cast<int64_t>(B) * P >
      (1 << 30))
    throw std::invalid_argument("rnnkern._cuda: layer too large for 32-bit row indices");
}

// Plan against the current device, including the cooperative-launch occupancy check.
// weights_aligned: the launch's weight pointers are 8-byte aligned (plans without a launch
// assume so, as torch's allocations are).
Plan plan_for(bool backward, int cell, int dtype, bool tf32, int B, int H, int P, bool proj,
              bool weights_aligned, KernelFn* kernel_out) {
  const DeviceInfo dev = current_device();
  const KernelFn kernel = kernel_for(backward, cell, dtype);
  const void* k = reinterpret_cast<const void*>(kernel);
  const char* what = backward ? "layer_backward" : "layer_forward";
  const size_t budget = dynamic_smem_budget(k, dev, "cudaFuncGetAttributes");
  Plan p = make_plan(backward, cell, dtype, B, H, P, proj, dev.sms, budget,
                     mma_unfit(dtype, tf32, backward, H, P, dev.major, weights_aligned));
  allow_cooperative(k, p.blocks, p.smem, dev, what);
  if (kernel_out) *kernel_out = kernel;
  return p;
}

LaunchInfo info_of(const Plan& p) {
  return LaunchInfo{p.blocks, kThreads, p.Hb, p.Pb, p.Bc, p.resident,
                    static_cast<int64_t>(p.smem), p.bsplit, p.Bg, p.own_smem, p.matvec};
}

bool aligned8(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 7) == 0; }
bool weights_aligned(const ForwardArgs& a) { return aligned8(a.w_hh) && aligned8(a.w_hr); }
bool weights_aligned(const BackwardArgs& a) { return aligned8(a.w_t) && aligned8(a.wr_t); }

template <typename Args>
LaunchInfo launch(bool backward, const Args& a, bool proj, void* stream, int64_t timeout_ns,
                  bool debug) {
  check_shape(a.cell, a.T, a.B, a.H, a.P);
  if (a.sync == nullptr) throw std::invalid_argument("rnnkern._cuda: sync buffer is null");
  KernelFn kernel = nullptr;
  Plan p = plan_for(backward, a.cell, a.dtype, a.tf32 != 0, a.B, a.H, a.P, proj,
                    weights_aligned(a), &kernel);
  p.timeout_ns = timeout_ns;
  check(cudaGetLastError(), "a CUDA call before the rnnkern launch");
  check(launch_cooperative(reinterpret_cast<void (*)(Args, Plan)>(kernel), p.blocks, p.smem,
                           static_cast<cudaStream_t>(stream), a, p),
        backward ? "cudaLaunchCooperativeKernel(layer_backward)"
                 : "cudaLaunchCooperativeKernel(layer_forward)");
  check(cudaGetLastError(), backward ? "layer_backward launch" : "layer_forward launch");
  if (debug)
    check(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)),
          backward ? "layer_backward (debug synchronise)" : "layer_forward (debug synchronise)");
  return info_of(p);
}

}  // namespace

LaunchInfo layer_forward(const ForwardArgs& a, void* stream, int64_t timeout_ns, bool debug) {
  const bool proj = a.cell == kLSTM && a.w_hr != nullptr;
  if (a.cell != kLSTM && a.P != a.H)
    throw std::invalid_argument("rnnkern._cuda: P must equal H without an LSTM projection");
  if (proj && a.m == nullptr)
    throw std::invalid_argument("rnnkern._cuda: the projection needs the m scratch buffer");
  if (a.save && a.cell != kRNNTanh && a.cell != kRNNRelu && a.gates == nullptr)
    throw std::invalid_argument("rnnkern._cuda: save needs the gates buffer");
  return launch(false, a, proj, stream, timeout_ns, debug);
}

LaunchInfo layer_backward(const BackwardArgs& a, void* stream, int64_t timeout_ns, bool debug) {
  const bool proj = a.cell == kLSTM && a.wr_t != nullptr;
  if (a.cell != kLSTM && a.P != a.H)
    throw std::invalid_argument("rnnkern._cuda: P must equal H without an LSTM projection");
  if (proj && (a.dht == nullptr || a.dh_proj == nullptr))
    throw std::invalid_argument("rnnkern._cuda: the projection needs dht and dh_proj buffers");
  if (a.cell == kGRU && a.dgh == nullptr)
    throw std::invalid_argument("rnnkern._cuda: the GRU backward needs the dgh buffer");
  return launch(true, a, proj, stream, timeout_ns, debug);
}

LaunchInfo plan_forward(int cell, int dtype, int B, int H, int P, bool proj, bool tf32) {
  return info_of(plan_for(false, cell, dtype, tf32, B, H, P, proj, true, nullptr));
}

LaunchInfo plan_backward(int cell, int dtype, int B, int H, int P, bool proj, bool tf32) {
  return info_of(plan_for(true, cell, dtype, tf32, B, H, P, proj, true, nullptr));
}

DeviceInfo device_info() { return query_device(); }

bool dtype_compiled(int dtype) {
  return dtype == kFloat32 || (dtype == kFloat16 && RNNKERN_WITH_F16) ||
         (dtype == kBFloat16 && RNNKERN_WITH_BF16);
}

}  // namespace rnnkern_cuda
