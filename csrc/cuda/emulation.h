// A CPU emulation of the part of the CUDA execution model and runtime that csrc/cuda uses, so
// that the same kernel sources (recurrence.cu, generate.cu) compile with a host C++ compiler
// into rnnkern._cuda_emulated and run on CPU memory. It exists to test the kernels' logic on
// machines without a GPU (tests/conftest.py: cuda_kernels): indexing, work split, batch chunks,
// barriers and the exchange between blocks, sampling, error reporting. It says nothing about
// speed, and it cannot find what only the hardware does (the memory model, occupancy): the
// GPU check (benchmarks/gpu_check.sh) stays the authority.
//
// Included instead of the CUDA headers when RNNKERN_CUDA_EMULATION is defined (see
// device_common.cuh).
//
// The model: every CUDA thread of the grid is a fiber with its own stack (emulation.cpp
// switches them with a few instructions on x86-64, with ucontext elsewhere), and one launch
// runs all of them on the calling OS thread, switching only where a CUDA thread would wait:
// __syncthreads (and its _or / _and forms), the warp collectives (__shfl*_sync,
// __ballot_sync, __all_sync, __any_sync, __syncwarp) and the kernels' polling loops (every
// 256 polls: device_common.cuh's poll_pause). A fiber runs until it has to wait, which is
// adversarial for a missing barrier: a thread that should have waited for the others reads
// what they have not written yet, or overwrites what they still read. Shared memory starts as
// NaN bytes and is fenced by canaries checked after the launch. When every live thread waits
// at a barrier that cannot complete (a barrier inside divergent code), the launch fails with
// an error naming the block instead of hanging. Warp collectives require all 32 lanes (full
// masks, converged warps), as the kernels here use them.
//
// Device properties (multiprocessors, shared memory per block) are set by configure(), so a
// test can lay a small layer over several blocks or make its weights too large for shared
// memory. Each configure() is a new device ordinal: per-device caches of the launchers see a
// new device instead of stale attributes.
//
// Schedules. By default the scheduler visits the threads in order, each running until it
// waits. With a schedule seed it instead visits, in every round, the threads of a random half
// of the blocks in a random order (xorshift64*, seeded by the seed and the launch count), so
// some blocks run ahead of others for a while: protocols that let blocks proceed without a
// grid-wide barrier (generate.cu's flag-carrying words) meet other interleavings, and their
// results must not change.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>

// ---- keywords: host functions all -------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace rnnkern_emu {

struct Dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

// The CUDA thread now running on this OS thread (null outside a launch).
struct ThreadState {
  Dim3 thread_idx, block_idx, grid_dim, block_dim;
  unsigned char* smem;  // the block's dynamic shared memory
  void* block;          // the scheduler's block (barrier and warp states)
};
ThreadState* current();

// Waiting points (emulation.cpp). All of them are called by every thread of the block (or
// warp) in the same order, as on the GPU.
int block_barrier(int value, int op);  // op 0: none, 1: or, 2: and, 3: count
uint64_t warp_exchange(uint64_t value, int src_lane, int op);  // see the collectives below
// Every lane's n <= kGatherMax values to every lane, lane-major into out[32 * n] (one warp
// collective: the emulated mma's fragments in one exchange instead of 3 x 32 shuffles).
constexpr int kGatherMax = 4;
void warp_gather(const uint64_t* values, int n, uint64_t* out);
void yield();                          // a polling thread lets the others run
// Throws, naming the block, the thread and the address, unless p is a multiple of `align`
// bytes. The GPU faults on a misaligned load or store (and the fault ends the CUDA context);
// x86 reads it without complaint, so without this check a layout or stride that breaks a
// vector access's alignment would pass every emulated test and fail on the first GPU run.
void check_aligned(const void* p, size_t align, const char* what);

// Launches body() in `blocks` x `threads` fibers with `smem` bytes of dynamic shared memory
// per block and returns when all have finished. Throws std::runtime_error on a deadlock.
void run_grid(int blocks, int threads, size_t smem, const std::function<void()>& body);

// The emulated device (configure() starts a new one). Defaults: 4 SMs, 227 KB (an H100).
struct Device {
  int ordinal, sms, smem_optin, major, minor;
  uint64_t schedule_seed;  // 0: threads in order; else random rounds (see Schedules above)
};
Device device();
void configure(int sms, int smem_optin, uint64_t schedule_seed);

// Checks of the emulation itself (tests/test_cuda_emulation.py): float32 -> 16-bit -> float32
// through the conversions below, element by element (dtype 1: float16, 2: bfloat16; bits get
// the 16-bit patterns); and a launch whose thread 0 skips a __syncthreads the other threads
// of its block wait at (must fail with the deadlock error); one whose thread 0 writes one
// byte past its block's 256 bytes of shared memory (must fail naming the overrun); and one
// with a misaligned vector load (must fail naming it).
void convert_16bit(const float* src, uint16_t* bits, float* back, int64_t n, int dtype);
void launch_divergent_barrier();
void launch_smem_overrun();
void launch_misaligned_load();  // thread 5 loads a float4 4 bytes past a 16-byte boundary

}  // namespace rnnkern_emu

// ---- built-in variables -------------------------------------------------------------------
#define threadIdx (::rnnkern_emu::current()->thread_idx)
#define blockIdx (::rnnkern_emu::current()->block_idx)
#define gridDim (::rnnkern_emu::current()->grid_dim)
#define blockDim (::rnnkern_emu::current()->block_dim)

// The kernels declare their dynamic shared memory through this macro (device_common.cuh).
#define RNNKERN_DYNAMIC_SMEM(name) unsigned char* name = ::rnnkern_emu::current()->smem

using std::max;
using std::min;

// ---- bit casts and bit counts -------------------------------------------------------------
inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline int __ffs(unsigned int x) { return x == 0 ? 0 : __builtin_ctz(x) + 1; }
inline int __clz(unsigned int x) { return x == 0 ? 32 : __builtin_clz(x); }

// ---- vector and 16-bit types --------------------------------------------------------------
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};

// IEEE binary16 and bfloat16 as their bits; conversions round to nearest even, as
// __float2half_rn / __float2bfloat16_rn do. torch's float16 / bfloat16 tensors hold the same
// bits.
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
  if (exp == 0x1f) return __uint_as_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp != 0) return __uint_as_float(sign | ((exp + 112) << 23) | (man << 13));  // 15 -> 127
  const float sub = static_cast<float>(man) * 5.9604644775390625e-8f;  // subnormal: man * 2^-24
  return __uint_as_float(__float_as_uint(sub) | sign);
}

inline __half __float2half_rn(float f) {
  const uint32_t x = __float_as_uint(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return __half{static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
  if (ax >= 0x477ff000u) return __half{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (ax >= 0x38800000u) {  // normal half (|f| >= 2^-14)
    const uint32_t r = ax + 0x00000fffu + ((ax >> 13) & 1u);  // round to nearest even
    return __half{static_cast<uint16_t>(sign | ((r - 0x38000000u) >> 13))};
  }
  // subnormal half or zero: the value in units of 2^-24 (exact: a power-of-two scaling),
  // rounded to nearest even
  const float units = __uint_as_float(ax) * 16777216.0f;
  return __half{static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(units)))};
}

inline float __bfloat162float(__nv_bfloat16 h) {
  return __uint_as_float(static_cast<uint32_t>(h.bits) << 16);
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t x = __float_as_uint(f);
  if ((x & 0x7fffffffu) > 0x7f800000u)  // NaN: stays a quiet NaN
    return __nv_bfloat16{static_cast<uint16_t>((x >> 16) | 0x40u)};
  x += 0x7fffu + ((x >> 16) & 1u);  // round to nearest even
  return __nv_bfloat16{static_cast<uint16_t>(x >> 16)};
}

// ---- loads, atomics, timers -----------------------------------------------------------------
template <typename T>
inline T __ldg(const T* p) {
  ::rnnkern_emu::check_aligned(p, alignof(T), "__ldg");
  return *p;
}
template <typename T>
inline T __ldcg(const T* p) {
  ::rnnkern_emu::check_aligned(p, alignof(T), "__ldcg");
  return *p;
}

inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long expected,
                                    unsigned long long desired) {
  __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return expected;  // the old value either way
}

inline void __nanosleep(unsigned int) { ::rnnkern_emu::yield(); }
// A trap aborts the process, as on the GPU it ends the context (the kernels trap only where
// the host-side plan rules the path out).
[[noreturn]] inline void __trap() {
  std::fputs("rnnkern._cuda_emulated: __trap() reached\n", stderr);
  std::abort();
}

// ---- block barriers -----------------------------------------------------------------------
inline void __syncthreads() { ::rnnkern_emu::block_barrier(0, 0); }
inline int __syncthreads_or(int p) { return ::rnnkern_emu::block_barrier(p != 0, 1); }
inline int __syncthreads_and(int p) { return ::rnnkern_emu::block_barrier(p != 0, 2); }

// ---- warp collectives (full masks only) ---------------------------------------------------
namespace rnnkern_emu {
void check_full_mask(unsigned int mask, const char* what);
enum WarpOp : int { kShuffle = 0, kBallot = 1, kSync = 2 };
template <typename T>
inline T shuffle(unsigned int mask, T v, int src_lane, const char* what) {
  static_assert(sizeof(T) <= 8, "warp shuffles of at most 8 bytes");
  check_full_mask(mask, what);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = warp_exchange(bits, src_lane & 31, kShuffle);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
}  // namespace rnnkern_emu

template <typename T>
inline T __shfl_sync(unsigned int mask, T v, int src_lane) {
  return ::rnnkern_emu::shuffle(mask, v, src_lane, "__shfl_sync");
}
template <typename T>
inline T __shfl_xor_sync(unsigned int mask, T v, int lane_mask) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  return ::rnnkern_emu::shuffle(mask, v, lane ^ lane_mask, "__shfl_xor_sync");
}
inline unsigned int __ballot_sync(unsigned int mask, int pred) {
  ::rnnkern_emu::check_full_mask(mask, "__ballot_sync");
  return static_cast<unsigned int>(
      ::rnnkern_emu::warp_exchange(pred != 0, 0, ::rnnkern_emu::kBallot));
}
inline int __all_sync(unsigned int mask, int pred) {
  return __ballot_sync(mask, pred) == 0xffffffffu;
}
inline int __any_sync(unsigned int mask, int pred) { return __ballot_sync(mask, pred) != 0u; }
inline void __syncwarp(unsigned int mask = 0xffffffffu) {
  ::rnnkern_emu::check_full_mask(mask, "__syncwarp");
  ::rnnkern_emu::warp_exchange(0, 0, ::rnnkern_emu::kSync);
}

// ---- tensor cores ----------------------------------------------------------------------------
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}, D = A B + C with A 16x16, B 16x8, per
// the PTX ISA's "Matrix Fragments for mma.m16n8k16 with floating point type" (groupID =
// lane >> 2, tid = lane % 4; elements low to high in each 32-bit register):
//   A: a[0] = (row g, cols 2t, 2t+1), a[1] = (row g+8, same), a[2] = (row g, cols 2t+8, 2t+9),
//      a[3] = (row g+8, same);  B: b[0] = (rows 2t, 2t+1, col g), b[1] = (rows 2t+8, 2t+9);
//   C / D: c[0], c[1] = (row g, cols 2t, 2t+1), c[2], c[3] = (row g+8, same).
// The warp's fragments are gathered in one warp collective (as on the GPU, all 32 lanes call
// it), and each lane computes its four elements in float32 (the 16-bit products are exact in
// float32; the hardware's accumulation order is unspecified, this one adds k in order).
namespace rnnkern_emu {
// Every lane's A (a[0..3]) and B (b[0..1]) registers, lane-major in all[32 * 3] as the 64-bit
// pairs {a0, a1}, {a2, a3}, {b0, b1}: one warp collective (all 32 lanes call it).
inline void gather_fragments(const uint32_t (&a)[4], const uint32_t (&b)[2], uint64_t* all) {
  const uint64_t mine[3] = {a[0] | (uint64_t{a[1]} << 32), a[2] | (uint64_t{a[3]} << 32),
                            b[0] | (uint64_t{b[1]} << 32)};
  warp_gather(mine, 3, all);
}

// The calling lane's four D elements of D = A B + C (16 x K times K x 8; C / D fragment: row g
// (+8 for elements 2, 3), columns 2t, 2t+1), summing k in order in float32.
template <int K>
inline void mma_lane_result(const float (&A)[16][K], const float (&Bm)[K][8],
                            const float (&c)[4], float (&d)[4]) {
  const int lane = static_cast<int>(current()->thread_idx.x % 32);
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = t * 2 + (i & 1);
    float acc = c[i];
    for (int k = 0; k < K; ++k) acc = std::fma(A[row][k], Bm[k][col], acc);
    d[i] = acc;
  }
}

// (H: __nv_bfloat16 for .bf16, __half for .f16; the fragments are the same.)
template <typename H>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                         const float (&c)[4]) {
  float A[16][16], Bm[16][8];
  const auto half = [](uint32_t reg, int hi) {
    const H h{static_cast<uint16_t>(hi ? reg >> 16 : reg)};
    if constexpr (std::is_same<H, __half>::value)
      return __half2float(h);
    else
      return __bfloat162float(h);
  };
  uint64_t all[32 * 3];
  gather_fragments(a, b, all);
  for (int src = 0; src < 32; ++src) {
    const uint64_t a01 = all[src * 3], a23 = all[src * 3 + 1], b01 = all[src * 3 + 2];
    const uint32_t ra[4] = {static_cast<uint32_t>(a01), static_cast<uint32_t>(a01 >> 32),
                            static_cast<uint32_t>(a23), static_cast<uint32_t>(a23 >> 32)};
    const uint32_t rb[2] = {static_cast<uint32_t>(b01), static_cast<uint32_t>(b01 >> 32)};
    const int g = src >> 2, t = src & 3;
    for (int i = 0; i < 8; ++i) {  // a_i: register i / 2, half i % 2
      const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
      const int col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = half(ra[i / 2], i & 1);
    }
    for (int i = 0; i < 4; ++i) {  // b_i
      const int row = t * 2 + (i & 1) + (i >= 2 ? 8 : 0);
      Bm[row][g] = half(rb[i / 2], i & 1);
    }
  }
  mma_lane_result(A, Bm, c, d);
}

// cvt.rna.tf32.f32: x rounded to 10 mantissa bits, to nearest with ties away from zero (add
// half of the dropped unit to the magnitude, then clear the 13 dropped bits; a carry into the
// exponent is the right rounding up, to infinity past the largest value). Infinities and NaN
// pass through.
inline uint32_t cvt_rna_tf32(float x) {
  const uint32_t u = __float_as_uint(x);
  if ((u & 0x7f800000u) == 0x7f800000u) return u;
  return (u + 0x1000u) & 0xffffe000u;
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, D = A B + C with A 16x8, B 8x8, per the
// PTX ISA's "Matrix Fragments for mma.m16n8k8" (.tf32; groupID g = lane >> 2, tid t = lane % 4;
// one element per 32-bit register):
//   A: a[0] = (row g, col t), a[1] = (row g+8, col t), a[2] = (row g, col t+4),
//      a[3] = (row g+8, col t+4);  B: b[0] = (row t, col g), b[1] = (row t+4, col g);
//   C / D: as m16n8k16 above.
// The tensor cores read only a TF32 operand's top 19 bits, so the low 13 bits are dropped
// here too (a kernel that skipped tf32_bits would truncate, as on the GPU); the products of
// TF32 values are exact in float32; k is added in order.
inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                             const float (&c)[4]) {
  float A[16][8], Bm[8][8];
  uint64_t all[32 * 3];
  gather_fragments(a, b, all);
  for (int src = 0; src < 32; ++src) {
    const int g = src >> 2, t = src & 3;
    const auto f = [](uint64_t pair, int hi) {
      return __uint_as_float(static_cast<uint32_t>(hi ? pair >> 32 : pair) & 0xffffe000u);
    };
    const uint64_t a01 = all[src * 3], a23 = all[src * 3 + 1], b01 = all[src * 3 + 2];
    A[g][t] = f(a01, 0);
    A[g + 8][t] = f(a01, 1);
    A[g][t + 4] = f(a23, 0);
    A[g + 8][t + 4] = f(a23, 1);
    Bm[t][g] = f(b01, 0);
    Bm[t + 4][g] = f(b01, 1);
  }
  mma_lane_result(A, Bm, c, d);
}
}  // namespace rnnkern_emu

// ---- the runtime API the launchers call -----------------------------------------------------
enum cudaError_t : int { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 4,
                         cudaErrorCooperativeLaunchTooLarge = 720 };  // fmt: skip
using cudaStream_t = void*;
struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
enum cudaDeviceAttr : int {
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaDevAttrCooperativeLaunch,
  cudaDevAttrComputeCapabilityMajor,
  cudaDevAttrComputeCapabilityMinor,
};
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize };
struct cudaFuncAttributes {
  size_t sharedSizeBytes;
};

const char* cudaGetErrorName(cudaError_t err);
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetLastError();
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void* func);
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value);
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* func,
                                                          int threads, size_t smem);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
// A launch runs at once, to the end, on the calling thread (device_common.cuh's
// launch_cooperative calls it with the kernel bound to its arguments).
cudaError_t emulated_launch(int blocks, int threads, size_t smem,
                            const std::function<void()>& body);
