// Device and host helpers shared by the persistent kernels of csrc/cuda (recurrence.cu:
// training layers; generate.cu: whole-sequence generation): element conversion, warp and block
// matrix-vector products, shared-memory staging, the grid-wide barrier, device queries.
// Included by one translation unit each; everything is in an anonymous namespace, so each
// gets its own copy and nothing clashes at link time.
#pragma once

#ifdef RNNKERN_CUDA_EMULATION
#include "emulation.h"  // the same kernels on the CPU (tests): see emulation.h
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
// The kernels' dynamic shared memory (a macro so that the CPU emulation can give each block
// its own buffer).
#define RNNKERN_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

#include <functional>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "api.h"

#ifndef RNNKERN_WITH_F16
#define RNNKERN_WITH_F16 1
#endif
#ifndef RNNKERN_WITH_BF16
#define RNNKERN_WITH_BF16 1
#endif

namespace rnnkern_cuda {
namespace {

constexpr int kThreads = 512;           // 16 warps: enough to cover smem latency in the matvecs
constexpr int kWarps = kThreads / 32;
constexpr int kBatchPerTask = 4;        // batch rows one warp task multiplies with one weight row

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("rnnkern._cuda: ") + what + " failed: " +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

__host__ __device__ constexpr int gate_count(int cell) {
  return cell == kLSTM ? 4 : cell == kGRU ? 3 : 1;
}

__host__ __device__ inline size_t align16(size_t bytes) { return (bytes + 15) & ~size_t(15); }

// Vector loads and stores through a pointer of another element type (8-byte weight and x
// pairs, float4 rows). The GPU requires sizeof(V) alignment and faults otherwise; the
// emulation checks it here, since a misaligned stride or layout offset would give right
// results on the CPU. (__ldcg / __ldg are checked by the emulation itself.)
template <typename V>
__device__ __forceinline__ V load_vec(const void* p) {
#ifdef RNNKERN_CUDA_EMULATION
  rnnkern_emu::check_aligned(p, alignof(V), "vector load");
#endif
  return *static_cast<const V*>(p);
}
template <typename V>
__device__ __forceinline__ void store_vec(void* p, V v) {
#ifdef RNNKERN_CUDA_EMULATION
  rnnkern_emu::check_aligned(p, alignof(V), "vector store");
#endif
  *static_cast<V*>(p) = v;
}

// Register tiles of the tiled matvec (block_matvec_tiled) and its split-K partial sums.
constexpr int kTileRows = 4;    // weight rows per warp tile of the tiled matvec
constexpr int kTileBatch = 8;   // batch rows per warp tile (kTileRows * kTileBatch == 32 lanes)
constexpr int kPartial = kWarps * kTileRows * kTileBatch;

// The block matvecs (recurrence.cu's Plan::matvec; uniform over the grid).
constexpr int kMatvecSimple = 0;  // block_matvec: one weight row per warp task (a cross-check)
constexpr int kMatvecTiled = 1;   // block_matvec_tiled: register tiles, float32 FMAs
constexpr int kMatvecMma = 2;     // block_matvec_mma: tensor cores (16-bit or TF32, sm_80+)
// Batch rows per warp task of the mma matvec (two n8 tiles share each weight fragment), and
// the split-K buffer it asks for: 8 warps' partial sums of 16 rows x 16 batch rows.
constexpr int kMmaBatch = 16;
constexpr int kPartialMma = 8 * 16 * kMmaBatch;

// Row stride (elements of `bytes` bytes) of the mma matvec's operands in shared memory
// (weights and staged x: bfloat16, or float32 for TF32): n rounded up so that a row is 32 mod
// 64 bytes long. Its warp-wide loads take 4 lanes x 8 bytes (4 bfloat16 or 2 float32
// consecutive elements) from each of 8 rows, served as two half-warp phases of 4 rows. Rows a
// multiple of 128 bytes apart (every bfloat16 n % 64 == 0) share their banks: 4-way
// conflicts. At 32 mod 64 bytes the 4 rows of a phase start 0, 32, 64 and 96 bytes apart mod
// 128, and no bank is hit twice. The FMA matvecs read a row with consecutive lanes and need no
// padding.
__host__ __device__ inline int mma_stride(int n, int bytes) {
  const int unit = 64 / bytes, half = 32 / bytes;  // elements in 64 and in 32 bytes
  return n + (unit + half - n % unit) % unit;
}

// ---------------------------------------------------------------------------------------------
// device helpers
// ---------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) {
  return v;
}
#if RNNKERN_WITH_F16
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
#endif
#if RNNKERN_WITH_BF16
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
#endif

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
#if RNNKERN_WITH_F16
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
#endif
#if RNNKERN_WITH_BF16
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
#endif

// Accurate expf / tanhf (no fast math): the float32 tests compare at ~1e-5.
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// One step of the cell of one hidden unit, the formulas of every forward kernel here:
// gx / gh are the input and recurrent parts of the G pre-activations (biases included);
// c_prev is the unit's cell (LSTM) and h_prev its previous state (GRU). Returns the activated
// gates (LSTM i, f, g, o; GRU r, z, n), the new cell (LSTM) and the unit's output h (LSTM:
// o * tanh(c), before any projection).
template <int CELL>
struct CellStep {
  float gate[gate_count(CELL)];
  float c, h;
};

template <int CELL>
__device__ __forceinline__ CellStep<CELL> cell_step(const float (&gx)[gate_count(CELL)],
                                                    const float (&gh)[gate_count(CELL)],
                                                    float c_prev, float h_prev) {
  CellStep<CELL> s;
  if (CELL == kLSTM) {
    s.gate[0] = sigmoid(gx[0] + gh[0]);
    s.gate[1] = sigmoid(gx[1] + gh[1]);
    s.gate[2] = tanhf(gx[2] + gh[2]);
    s.gate[3] = sigmoid(gx[3] + gh[3]);
    s.c = fmaf(s.gate[1], c_prev, s.gate[0] * s.gate[2]);
    s.h = s.gate[3] * tanhf(s.c);
  } else if (CELL == kGRU) {
    s.gate[0] = sigmoid(gx[0] + gh[0]);
    s.gate[1] = sigmoid(gx[1] + gh[1]);
    s.gate[2] = tanhf(fmaf(s.gate[0], gh[2], gx[2]));  // n = tanh(gx_n + r * (W_hn h + b_hn))
    s.c = 0.f;
    s.h = (1.f - s.gate[1]) * s.gate[2] + s.gate[1] * h_prev;
  } else {
    const float pre = gx[0] + gh[0];
    s.gate[0] = CELL == kRNNTanh ? tanhf(pre) : fmaxf(pre, 0.f);
    s.c = 0.f;
    s.h = s.gate[0];
  }
  return s;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Called by every polling loop once per 256 polls (where it also checks for errors and the
// timeout): nothing on a GPU; under the emulation the waiting thread lets the others run (on
// one OS thread a spin loop would otherwise never see their writes).
#ifndef RNNKERN_CUDA_EMULATION
__device__ __forceinline__ void poll_pause() {}
#else
inline void poll_pause() { rnnkern_emu::yield(); }
#endif

#ifndef RNNKERN_CUDA_EMULATION
__device__ __forceinline__ unsigned long long load_acquire(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void red_release_add(unsigned long long* p, unsigned long long v) {
  asm volatile("red.release.gpu.global.add.u64 [%0], %1;" : : "l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return static_cast<long long>(t);
}
#else
// Emulation: the same orderings with the compiler's atomics.
inline unsigned long long load_acquire(const unsigned long long* p) {
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

inline void red_release_add(unsigned long long* p, unsigned long long v) {
  __atomic_fetch_add(p, v, __ATOMIC_RELEASE);
}

inline long long global_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
#endif

// Phase tracing (api.h: kTracePoints; `points` per step): thread 0 stamps `point` of
// processing step `step` when the launch traces it. Call it right after a block-wide
// synchronisation.
__device__ __forceinline__ void trace_point(long long* trace, int trace_steps, int step,
                                            int point, int points = kTracePoints) {
  if (trace != nullptr && step < trace_steps && threadIdx.x == 0)
    trace[(static_cast<size_t>(blockIdx.x) * trace_steps + step) * points + point] = global_ns();
}

// Grid-wide barrier on a monotonic arrival counter: the k-th barrier completes when the
// counter reaches k * blocks (64 bits: no wrap-around for any realistic T). Co-residency of
// all blocks is guaranteed by the cooperative launch. Returns false when the kernel must stop:
// this block waited past the timeout (it then records kErrBarrierTimeout) or another block
// already recorded an error. Every thread of the block gets the same answer.
struct GridBarrier {
  unsigned long long* arrivals;  // sync[0]
  unsigned long long* error;     // sync[1]
  unsigned long long blocks;
  unsigned long long generation;  // barriers passed so far (meaningful in thread 0 only)
  long long timeout_ns;          // <= 0: wait forever

  __device__ bool wait() {
    __syncthreads();  // all of this block's writes for the phase are issued
    int good = 1;
    if (threadIdx.x == 0) {
      ++generation;
      const unsigned long long target = generation * blocks;
      // Release: the block's writes (ordered before this thread by __syncthreads) become
      // visible GPU-wide before the arrival is counted; the spin below loads with acquire.
      // (CUTLASS's GenericBarrier uses the same red.release / ld.acquire pair.)
      red_release_add(arrivals, 1ULL);
      const long long start = global_ns();
      unsigned int spins = 0;
      while (load_acquire(arrivals) < target) {
        if ((++spins & 255u) == 0) {
          poll_pause();
          if (load_acquire(error) != kErrNone) {
            good = 0;
            break;
          }
          if (timeout_ns > 0 && global_ns() - start > timeout_ns) {
            atomicCAS(error, 0ULL, static_cast<unsigned long long>(kErrBarrierTimeout));
            good = 0;
            break;
          }
        }
      }
    }
    // Thread 0's verdict to every thread (one barrier, as a plain __syncthreads would be);
    // the acquire load above + the barrier order the block's reads after the others' writes.
    return __syncthreads_and(good) != 0;
  }
};

// Row r of a weight slice: base + (r / per_gate) * gate_stride + (r % per_gate) * row_len.
template <typename T>
struct Rows {
  const T* base;
  long long gate_stride;
  int per_gate;
  int row_len;
  __device__ __forceinline__ const T* row(int r) const {
    return base + (r / per_gate) * gate_stride + static_cast<long long>(r % per_gate) * row_len;
  }
};

// out(bb, r, v) with v = sum_k x[bb*ldx + k] * W_r[k] for bb < nb, r < nrows.
// x: [nb][ldx] float in shared memory; W_r: row r of `rows` (K elements, shared or global).
// One warp per (row, group of 4 batch rows): each weight element is loaded once per 4 batch
// rows; lanes stride over k (conflict-free shared loads), then a warp reduction.
template <typename T, typename Out>
__device__ __forceinline__ void block_matvec(const float* x, int ldx, int nb, int K, int nrows,
                                             const Rows<T>& rows, Out out) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int groups = (nb + kBatchPerTask - 1) / kBatchPerTask;
  for (int task = warp; task < nrows * groups; task += kWarps) {
    const int r = task / groups;
    const int bb0 = (task % groups) * kBatchPerTask;
    const int nq = min(kBatchPerTask, nb - bb0);
    const T* w = rows.row(r);
    const float* x0 = x + static_cast<size_t>(bb0) * ldx;
    float acc[kBatchPerTask] = {0.f, 0.f, 0.f, 0.f};
    for (int k = lane; k < K; k += 32) {
      const float wk = to_float(w[k]);
#pragma unroll
      for (int q = 0; q < kBatchPerTask; ++q)
        if (q < nq) acc[q] = fmaf(wk, x0[q * ldx + k], acc[q]);
    }
#pragma unroll
    for (int q = 0; q < kBatchPerTask; ++q) acc[q] = warp_sum(acc[q]);
    if (lane == 0)
      for (int q = 0; q < nq; ++q) out(bb0 + q, r, acc[q]);
  }
}

// Reduce 32 values across the 32 lanes of a warp so that lane l ends with the sum over lanes
// of v[l] (31 shuffles instead of 32 * 5 for 32 separate butterflies): at each level a lane
// keeps one half of its values, sends the other half to its partner and adds what it gets.
template <int OFF>
__device__ __forceinline__ void transpose_sum_level(float (&v)[32], int lane) {
  const bool upper = (lane & OFF) != 0;
#pragma unroll
  for (int i = 0; i < OFF; ++i) {  // compile-time indices: v stays in registers
    const float send = upper ? v[i] : v[i + OFF];
    const float keep = upper ? v[i + OFF] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFF);
  }
}

__device__ __forceinline__ float warp_transpose_sum(float (&v)[32]) {
  const int lane = threadIdx.x % 32;
  transpose_sum_level<16>(v, lane);
  transpose_sum_level<8>(v, lane);
  transpose_sum_level<4>(v, lane);
  transpose_sum_level<2>(v, lane);
  transpose_sum_level<1>(v, lane);
  return v[0];  // after the 5 levels, slot 0 of lane l holds the total of value index l
}

// Adds the split-K partial sums [ks][nrows][nb] of the tiled and mma matvecs in a fixed order
// (deterministic results) and hands each total to out. Called by every thread of the block.
template <typename Out>
__device__ __forceinline__ void add_partials(const float* partial, int ks, int nb, int nrows,
                                             Out out) {
  __syncthreads();
  for (int idx = threadIdx.x; idx < nrows * nb; idx += kThreads) {
    const int r = idx / nb, bb = idx % nb;
    float v = 0.f;
    for (int kk = 0; kk < ks; ++kk) v += partial[(kk * nrows + r) * nb + bb];
    out(bb, r, v);
  }
  __syncthreads();  // partial is reused by the next call
}

// Same contract as block_matvec, register-tiled: one warp task is a tile of kTileRows weight
// rows x kTileBatch batch rows over a range of k (lanes stride k), so each k step loads 4
// weights and 8 activations for 32 FMAs (block_matvec: 5 loads for 4). When the block has
// fewer tiles than warps, k is split over up to 8 warps (ks); their partial sums go to
// `partial` [ks][nrows][nb] and are added in a fixed order (deterministic results).
// Called by every thread of the block (it synchronises when ks > 1).
template <typename T, typename Out>
__device__ __forceinline__ void block_matvec_tiled(const float* x, int ldx, int nb, int K,
                                                   int nrows, const Rows<T>& rows,
                                                   float* partial, Out out) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row_tiles = (nrows + kTileRows - 1) / kTileRows;
  const int batch_tiles = (nb + kTileBatch - 1) / kTileBatch;
  const int tiles = row_tiles * batch_tiles;
  // ks * tiles <= kWarps whenever ks > 1, so ks * nrows * nb <= kWarps * 32 = kPartial.
  const int ks = max(1, min(min(kWarps / tiles, 8), K / 64));
  const int kchunk = ((K + ks - 1) / ks + 31) / 32 * 32;
  for (int task = warp; task < tiles * ks; task += kWarps) {
    const int tile = task % tiles, kk = task / tiles;
    const int r0 = (tile / batch_tiles) * kTileRows;
    const int bb0 = (tile % batch_tiles) * kTileBatch;
    const int nr = min(kTileRows, nrows - r0), nq = min(kTileBatch, nb - bb0);
    const int k_end = min(K, (kk + 1) * kchunk);
    const T* w[kTileRows];
#pragma unroll
    for (int i = 0; i < kTileRows; ++i) w[i] = rows.row(min(r0 + i, nrows - 1));  // clamped
    const float* x0 = x + static_cast<size_t>(bb0) * ldx;
    float acc[kTileRows * kTileBatch];
#pragma unroll
    for (int i = 0; i < kTileRows * kTileBatch; ++i) acc[i] = 0.f;
    for (int k = kk * kchunk + lane; k < k_end; k += 32) {
      float wv[kTileRows];
#pragma unroll
      for (int i = 0; i < kTileRows; ++i) wv[i] = to_float(w[i][k]);
#pragma unroll
      for (int q = 0; q < kTileBatch; ++q) {
        if (q < nq) {
          const float xv = x0[q * ldx + k];
#pragma unroll
          for (int i = 0; i < kTileRows; ++i)
            acc[i * kTileBatch + q] = fmaf(wv[i], xv, acc[i * kTileBatch + q]);
        }
      }
    }
    const float v = warp_transpose_sum(acc);  // lane l: row r0 + l / 8, batch bb0 + l % 8
    const int i = lane / kTileBatch, q = lane % kTileBatch;
    if (i < nr && q < nq) {
      if (ks == 1)
        out(bb0 + q, r0 + i, v);
      else
        partial[(kk * nrows + r0 + i) * nb + bb0 + q] = v;
    }
  }
  if (ks > 1) add_partials(partial, ks, nb, nrows, out);
}

// Two float32 values as one register of two 16-bit H (bfloat16 or float16), each rounded to
// nearest even, lo in the low half (the element order of the mma fragments). On the GPU one
// paired conversion (__floats2bfloat162_rn / __floats2half2_rn: .x = lo, the low half).
template <typename H>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
#ifdef RNNKERN_CUDA_EMULATION
  return static_cast<uint32_t>(from_float<H>(lo).bits) |
         (static_cast<uint32_t>(from_float<H>(hi).bits) << 16);
#else
#if RNNKERN_WITH_F16
  if constexpr (std::is_same<H, __half>::value) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
#endif
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
#endif
}

// x rounded to TF32 (10 mantissa bits), to nearest with ties away from zero (cvt.rna.tf32.f32;
// infinities and NaN pass through), as float32 bits with the low 13 bits zero. The tensor
// cores would otherwise just ignore those bits (truncation, a bias towards zero that adds up
// over a 1024-long row); rounding first makes the products those of the rounded operands,
// which the emulation reproduces bit for bit.
__device__ __forceinline__ uint32_t tf32_bits(float x) {
#ifdef RNNKERN_CUDA_EMULATION
  return rnnkern_emu::cvt_rna_tf32(x);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
#else
  __trap();
  return 0;
#endif
}

// Which tensor-core operands weights of type T take (all false for a type the build leaves
// out): TF32 for float32, bfloat16 or float16 pairs.
template <typename T>
struct MmaOperand {
  static constexpr bool kTf32 = std::is_same<T, float>::value;
#if RNNKERN_WITH_BF16
  static constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
#else
  static constexpr bool kBf16 = false;
#endif
#if RNNKERN_WITH_F16
  static constexpr bool kF16 = std::is_same<T, __half>::value;
#else
  static constexpr bool kF16 = false;
#endif
};

// d += A B on the tensor cores, float32 accumulation, A 16 x k, B k x 8, for weights of type
// T: TF32 operands for float (mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, k = 8),
// bfloat16 or float16 pairs (mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}..., k = 16);
// fragment layouts: emulation.h, after the PTX ISA. sm_80 and later; the plans never choose
// the mma matvec on an older device, where this traps.
template <typename T>
__device__ __forceinline__ void mma_16x8(float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
  constexpr bool kTf32 = MmaOperand<T>::kTf32, kF16 = MmaOperand<T>::kF16;
#ifdef RNNKERN_CUDA_EMULATION
  const float c[4] = {d[0], d[1], d[2], d[3]};
  if constexpr (kTf32)
    rnnkern_emu::mma_m16n8k8_tf32(d, a, b, c);
  else if constexpr (kF16)
    rnnkern_emu::mma_m16n8k16<__half>(d, a, b, c);
  else
    rnnkern_emu::mma_m16n8k16<__nv_bfloat16>(d, a, b, c);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define RNNKERN_MMA(shape_types)                                                       \
  asm volatile("mma.sync.aligned." shape_types " {%0, %1, %2, %3}, {%4, %5, %6, %7}, " \
               "{%8, %9}, {%0, %1, %2, %3};"                                           \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                        \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
  if constexpr (kTf32)
    RNNKERN_MMA("m16n8k8.row.col.f32.tf32.tf32.f32");
  else if constexpr (kF16)
    RNNKERN_MMA("m16n8k16.row.col.f32.f16.f16.f32");
  else
    RNNKERN_MMA("m16n8k16.row.col.f32.bf16.bf16.f32");
#undef RNNKERN_MMA
#else
  __trap();
#endif
}

// Same contract as block_matvec, on the tensor cores, for 16-bit weights (mma m16n8k16: bfloat16,
// or float16 in the forward) or float32 weights with TF32 allowed (mma m16n8k8), except that x
// is in the weights' type: 16-bit [nb][ldx] in shared memory (the staging rounds h, dpre, m or
// dht to it), or float32 rounded to TF32 here, as the weights are (tf32_bits). Products are
// exact and sums float32. That rounding is the numerical difference from the float32 matvecs:
// for 16-bit weights it is the one torch.nn's path in that dtype makes (its h and gradients are
// tensors of that dtype), and a 16-bit row also takes half the shared memory (larger batch
// chunks); TF32 is what cuDNN and cuBLAS do with float32 when torch allows it.
//
// A warp task is a tile of 16 weight rows x kMmaBatch batch rows over a range of k: per k
// step (16 bfloat16 / 8 float32 k), each lane loads 8 consecutive bytes of weights of 2 rows
// and of x of 2 batch rows (8-byte loads: the fragments' register pairs) and issues 2 mma
// (16 x 8 x k step). The products only need A's and B's k indices to agree, so the lane's
// physical k stand for the fragment's logical k: bfloat16 4t .. 4t+3 for (2t, 2t+1, 2t+8,
// 2t+9), float32 2t, 2t+1 for (t, t+4). One wide load per operand instead of two. Needs K, ldx
// and the row length multiples of 4 and the weight rows 8-byte aligned (make_plan checks).
// Split-K over warps as the tiled matvec, into `partial` [ks][nrows][nb] (ks * nrows * nb <=
// partial_elems). Called by every thread.
template <typename T, typename Out>
__device__ __forceinline__ void block_matvec_mma(const T* x, int ldx, int nb, int K, int nrows,
                                                 const Rows<T>& rows, float* partial,
                                                 int partial_elems, Out out) {
  constexpr bool kTf32 = MmaOperand<T>::kTf32;
  if constexpr (kTf32 || MmaOperand<T>::kBf16 || MmaOperand<T>::kF16) {
    constexpr int kStep = kTf32 ? 8 : 16;  // k per mma
    constexpr int kLaneK = kStep / 4;      // consecutive k one lane loads (8 bytes)
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, t = lane & 3;
    const int row_tiles = (nrows + 15) / 16;
    const int batch_tiles = (nb + kMmaBatch - 1) / kMmaBatch;
    const int tiles = row_tiles * batch_tiles;
    const int ksteps = (K + kStep - 1) / kStep;
    // at least 4 k steps per warp; the partial sums must fit their buffer
    const int ks = max(1, min(min(kWarps / tiles, ksteps / 4), partial_elems / (nrows * nb)));
    const int kchunk = (ksteps + ks - 1) / ks;
    // the operand registers of one 8-byte load (TF32: each float rounded)
    const auto regs = [](uint2 v) {
      if constexpr (kTf32) return uint2{tf32_bits(__uint_as_float(v.x)),
                                        tf32_bits(__uint_as_float(v.y))};
      else return v;
    };
    for (int task = warp; task < tiles * ks; task += kWarps) {
      const int tile = task % tiles, kk = task / tiles;
      const int r0 = (tile / batch_tiles) * 16, bb0 = (tile % batch_tiles) * kMmaBatch;
      const bool row_lo = r0 + g < nrows, row_hi = r0 + g + 8 < nrows;
      const T* w_lo = rows.row(row_lo ? r0 + g : 0);
      const T* w_hi = rows.row(row_hi ? r0 + g + 8 : 0);
      bool col[2];
      const T* xc[2];
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        col[n] = bb0 + 8 * n + g < nb;
        xc[n] = x + static_cast<size_t>(col[n] ? bb0 + 8 * n + g : 0) * ldx;
      }
      float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
      const int s_end = min(ksteps, (kk + 1) * kchunk);
      // two k steps in flight: the second step's loads are issued before the first's mma wait
#pragma unroll 2
      for (int st = kk * kchunk; st < s_end; ++st) {
        const int k = st * kStep + kLaneK * t;
        const bool in = k < K;  // K % 4 == 0: the lane's k are all in or all out
        const uint2 zero2 = {0u, 0u};
        const uint2 lo = (in && row_lo) ? regs(load_vec<uint2>(w_lo + k)) : zero2;
        const uint2 hi = (in && row_hi) ? regs(load_vec<uint2>(w_hi + k)) : zero2;
        const uint32_t a[4] = {lo.x, hi.x, lo.y, hi.y};
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          const uint2 v = (in && col[n]) ? regs(load_vec<uint2>(xc[n] + k)) : zero2;
          const uint32_t b[2] = {v.x, v.y};
          mma_16x8<T>(acc[n], a, b);
        }
      }
      // acc[n][i]: row r0 + g (+8 for i >= 2), batch row bb0 + 8n + 2t + (i & 1)
#pragma unroll
      for (int n = 0; n < 2; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = r0 + g + (i >= 2 ? 8 : 0), bb = bb0 + 8 * n + 2 * t + (i & 1);
          if (r < nrows && bb < nb) {
            if (ks == 1)
              out(bb, r, acc[n][i]);
            else
              partial[(kk * nrows + r) * nb + bb] = acc[n][i];
          }
        }
      }
    }
    if (ks > 1) add_partials(partial, ks, nb, nrows, out);
    return;
  }
  __trap();  // make_plan chooses the mma matvec for 16-bit weights, or float32 with TF32, only
}

// Dispatch between the matvecs (mode: kMatvec*, uniform over the grid). x: the staged rows,
// float, or in the 16-bit weight type for the 16-bit mma matvec (stage_rows with that
// destination).
template <typename T, typename Out>
__device__ __forceinline__ void matvec(int mode, const float* x, int ldx, int nb, int K,
                                       int nrows, const Rows<T>& rows, float* partial,
                                       int partial_elems, Out out) {
  if (mode == kMatvecMma)  // x: rows of the weights' type (16-bit, or float32 for TF32)
    block_matvec_mma<T>(reinterpret_cast<const T*>(x), ldx, nb, K, nrows, rows, partial,
                        partial_elems, out);
  else if (mode == kMatvecTiled)
    block_matvec_tiled<T>(x, ldx, nb, K, nrows, rows, partial, out);
  else
    block_matvec<T>(x, ldx, nb, K, nrows, rows, out);
}

// Walks one thread's elements e = start, start + kThreads, ... of rows of length n as (row,
// col) without a division per element: divisions by a run-time n cost registers, and the
// training kernels sit at their 128-register limit (the bfloat16 LSTM backward spilled 12-20
// bytes on sm_90 with per-element divisions in the staging).
struct RowWalk {
  int row, col, q, rem, n;
  __device__ __forceinline__ RowWalk(int start, int n_)
      : row(start / n_), col(start % n_), q(kThreads / n_), rem(kThreads % n_), n(n_) {}
  __device__ __forceinline__ void next() {
    col += rem;
    row += q;
    if (col >= n) {
      col -= n;
      ++row;
    }
  }
};

// Copy rows [b0, b0+nb) of a [B][K] matrix written by other blocks into shared memory.
// __ldcg reads through L2 (never a stale L1 line from an earlier step).
// 16-byte loads when the rows allow it (dst, the start of shared memory, is 16-byte aligned).
// kStageUnroll loads are issued before their stores: a plain loop would wait out one L2
// round trip (~0.5-1 us) per iteration, and a 64-row chunk takes a few dozen iterations.
constexpr int kStageUnroll = 8;

// Elements 4 * q .. 4 * q + 3 of p as floats (16-bit: one 8-byte load); p 4-element aligned.
__device__ __forceinline__ float4 load4_cg(const float* p, int q) {
  return __ldcg(reinterpret_cast<const float4*>(p) + q);
}
__device__ __forceinline__ float4 load4_cg(const __nv_bfloat16* p, int q) {
  const uint2 v = __ldcg(reinterpret_cast<const uint2*>(p) + q);
  const auto lo = [](uint32_t w) { return __uint_as_float(w << 16); };  // bf16 -> f32: exact
  const auto hi = [](uint32_t w) { return __uint_as_float(w & 0xffff0000u); };
  return float4{lo(v.x), hi(v.x), lo(v.y), hi(v.y)};
}

// Four floats into dst elements 4 * q .. 4 * q + 3, and one into dst[i] (16-bit D: rounded to
// nearest even, exact for values that came from that type).
template <typename D>
__device__ __forceinline__ void store4(D* dst, int q, float4 v) {
  if constexpr (std::is_same<D, float>::value)
    store_vec(dst + 4 * q, v);
  else
    store_vec(dst + 4 * q, uint2{pack2<D>(v.x, v.y), pack2<D>(v.z, v.w)});
}
template <typename D>
__device__ __forceinline__ void store1(D* dst, int i, float v) {
  dst[i] = from_float<D>(v);
}

// ld: the row stride of dst (ld >= K; K for dense rows, mma_stride(K, bytes) for the mma
// matvec). S (source): float, or bfloat16 (the bfloat16 backward's dpre rows); D (destination):
// float, or the 16-bit weight type (the 16-bit mma plans' staged rows).
template <typename S, typename D>
__device__ __forceinline__ void stage_rows(D* dst, int ld, const S* src, int b0, int nb, int K) {
  const S* s = src + static_cast<size_t>(b0) * K;
  const int n = nb * K;
  const bool dense = ld == K;  // (folded at compile time where the caller passes K twice)
  const bool vec = (dense ? (n & 3) == 0 : ((K | ld) & 3) == 0) &&
                   (reinterpret_cast<uintptr_t>(s) & (4 * sizeof(S) - 1)) == 0;
  // The place in dst of this thread's elements e = threadIdx.x, + kThreads, ... (units of 4
  // elements when vec), in that order: e itself when dense, else its (row, col) at stride dl.
  const int rl = vec ? K / 4 : K, dl = vec ? ld / 4 : ld;
  RowWalk walk(threadIdx.x, dense ? 1 : rl);  // (unused, and so removed, when dense; dense
                                              // rows may be shorter than 4 elements: rl = 0)
  const auto at = [&](int e) {
    if (dense) return e;
    const int d = walk.row * dl + walk.col;
    walk.next();
    return d;
  };
  if (vec) {
    const int n4 = n / 4;
    int i = threadIdx.x;
    for (; i + (kStageUnroll - 1) * kThreads < n4; i += kStageUnroll * kThreads) {
      float4 v[kStageUnroll];
#pragma unroll
      for (int u = 0; u < kStageUnroll; ++u) v[u] = load4_cg(s, i + u * kThreads);
#pragma unroll
      for (int u = 0; u < kStageUnroll; ++u) store4(dst, at(i + u * kThreads), v[u]);
    }
    for (; i < n4; i += kThreads) store4(dst, at(i), load4_cg(s, i));
  } else {
    int i = threadIdx.x;
    for (; i + (kStageUnroll - 1) * kThreads < n; i += kStageUnroll * kThreads) {
      float v[kStageUnroll];
#pragma unroll
      for (int u = 0; u < kStageUnroll; ++u) v[u] = to_float(__ldcg(s + i + u * kThreads));
#pragma unroll
      for (int u = 0; u < kStageUnroll; ++u) store1(dst, at(i + u * kThreads), v[u]);
    }
    for (; i < n; i += kThreads) store1(dst, at(i), to_float(__ldcg(s + i)));
  }
}

__device__ __forceinline__ void stage_rows(float* dst, const float* src, int b0, int nb, int K) {
  stage_rows(dst, K, src, b0, nb, K);
}

// Copy a weight slice of `rows` (nrows rows of row_len) into a [nrows][ld] array (ld: the row
// stride, at least row_len; 0, the default: dense). Once per launch; unrolled like stage_rows
// so the loads of one thread overlap.
template <typename T>
__device__ void stage_weights(T* dst, const Rows<T>& rows, int nrows, int ld = 0) {
  const int n = rows.row_len;
  if (ld == 0) ld = n;
  const long long total = static_cast<long long>(nrows) * n;
  RowWalk at(threadIdx.x, n);
  long long i = threadIdx.x;
  for (; i + (kStageUnroll - 1) * kThreads < total; i += kStageUnroll * kThreads) {
    T v[kStageUnroll];
    RowWalk from = at;
#pragma unroll
    for (int u = 0; u < kStageUnroll; ++u, from.next()) v[u] = rows.row(from.row)[from.col];
#pragma unroll
    for (int u = 0; u < kStageUnroll; ++u, at.next())
      dst[static_cast<long long>(at.row) * ld + at.col] = v[u];
  }
  for (; i < total; i += kThreads, at.next())
    dst[static_cast<long long>(at.row) * ld + at.col] = rows.row(at.row)[at.col];
}

// ---------------------------------------------------------------------------------------------
// host helpers
// ---------------------------------------------------------------------------------------------

int elem_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

DeviceInfo query_device() {
  DeviceInfo d{};
  check(cudaGetDevice(&d.device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, d.device),
        "cudaDeviceGetAttribute(MultiProcessorCount)");
  check(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, d.device),
        "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  check(cudaDeviceGetAttribute(&d.cooperative, cudaDevAttrCooperativeLaunch, d.device),
        "cudaDeviceGetAttribute(CooperativeLaunch)");
  check(cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, d.device),
        "cudaDeviceGetAttribute(ComputeCapabilityMajor)");
  check(cudaDeviceGetAttribute(&d.minor, cudaDevAttrComputeCapabilityMinor, d.device),
        "cudaDeviceGetAttribute(ComputeCapabilityMinor)");
  return d;
}

// Launch preparation is cached per device and kernel: each query is a host API call of a few
// microseconds, and there are about ten per launch, while a decoding step's kernel runs for
// about as long on the GPU. Device attributes and a kernel's static shared memory do not
// change within a process; the dynamic shared-memory attribute only ever grows.
struct KernelState {
  size_t static_smem = 0;
  size_t smem_allowed = 0;           // the largest dynamic size set so far
  std::map<size_t, int> per_sm;      // occupancy (blocks per SM) by dynamic size
};

struct LaunchCache {
  std::mutex mutex;
  std::map<int, DeviceInfo> devices;
  std::map<std::pair<int, const void*>, KernelState> kernels;
};

LaunchCache& launch_cache() {
  static LaunchCache cache;
  return cache;
}

// The current device's attributes (queried once per device).
DeviceInfo current_device() {
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  LaunchCache& c = launch_cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  auto it = c.devices.find(device);
  if (it == c.devices.end()) it = c.devices.emplace(device, query_device()).first;
  return it->second;
}

// Shared memory a cooperative kernel may use per block on `dev`: the opt-in maximum less the
// kernel's static shared memory.
size_t dynamic_smem_budget(const void* kernel, const DeviceInfo& dev, const char* what) {
  if (!dev.cooperative)
    throw std::runtime_error("rnnkern._cuda: device " + std::to_string(dev.device) +
                             " does not support cooperative launches");
  LaunchCache& c = launch_cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  auto key = std::make_pair(dev.device, kernel);
  auto it = c.kernels.find(key);
  if (it == c.kernels.end()) {
    cudaFuncAttributes attr{};
    check(cudaFuncGetAttributes(&attr, kernel), what);
    KernelState state;
    state.static_smem = attr.sharedSizeBytes;
    it = c.kernels.emplace(key, state).first;
  }
  return static_cast<size_t>(dev.smem_optin) - it->second.static_smem;
}

// Lets `kernel` use `smem` bytes of dynamic shared memory and checks that `blocks` blocks of
// kThreads threads can all be resident at once (what a cooperative launch requires).
// dynamic_smem_budget must have been called for the kernel first.
void allow_cooperative(const void* kernel, int blocks, size_t smem, const DeviceInfo& dev,
                       const std::string& what) {
  LaunchCache& c = launch_cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  KernelState& k = c.kernels[std::make_pair(dev.device, kernel)];
  if (smem > k.smem_allowed) {
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem)),
          ("cudaFuncSetAttribute(" + what + ", MaxDynamicSharedMemorySize)").c_str());
    k.smem_allowed = smem;
  }
  auto it = k.per_sm.find(smem);
  if (it == k.per_sm.end()) {
    int per_sm = 0;
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem),
          ("cudaOccupancyMaxActiveBlocksPerMultiprocessor(" + what + ")").c_str());
    it = k.per_sm.emplace(smem, per_sm).first;
  }
  const int per_sm = it->second;
  if (per_sm < 1 || blocks > per_sm * dev.sms)
    throw std::runtime_error("rnnkern._cuda: a cooperative " + what + " launch of " +
                             std::to_string(blocks) + " blocks with " + std::to_string(smem) +
                             " bytes of shared memory cannot be co-resident (" +
                             std::to_string(per_sm) + " per SM)");
}

// Enqueues a cooperative launch of kernel(args...) on `blocks` blocks of kThreads threads with
// `smem` bytes of dynamic shared memory (under the emulation: runs it to the end).
template <typename... Params>
cudaError_t launch_cooperative(void (*kernel)(Params...), int blocks, size_t smem,
                               cudaStream_t stream, Params... args) {
#ifdef RNNKERN_CUDA_EMULATION
  (void)stream;
  return emulated_launch(blocks, kThreads, smem, [&] { kernel(args...); });
#else
  void* params[] = {&args...};
  return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(blocks),
                                     dim3(kThreads), params, smem, stream);
#endif
}

}  // namespace
}  // namespace rnnkern_cuda
