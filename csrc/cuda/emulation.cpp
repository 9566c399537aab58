// The scheduler and runtime of the CPU emulation of csrc/cuda (emulation.h says what it is for
// and how it works).
#include "emulation.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace rnnkern_emu {
namespace {

// Stack of one emulated thread. The kernels keep a few KB of locals (register tiles of 32
// floats, staging arrays of 8 float4); 128 KB leaves a wide margin, and a guard page below
// each stack turns an overflow into a fault instead of silent corruption.
constexpr size_t kStackBytes = 128 * 1024;

// Bytes of a known pattern on both sides of every block's dynamic shared memory, checked after
// the launch: a kernel writing outside its shared memory (a layout that overlaps or overruns
// what the plan allotted) fails instead of corrupting a neighbour silently.
constexpr size_t kCanaryBytes = 64;
constexpr unsigned char kCanary = 0xa5;

enum class State { kRunnable, kWaiting, kDone };

struct Fiber;

// A counting barrier over `size` fibers that also reduces one int (or / and / count) and, for
// warps, exchanges one 64-bit value per lane.
struct Barrier {
  int size = 0;
  int arrived = 0;
  int acc = 0;
  int result = 0;
  std::vector<Fiber*> waiting;
};

struct Warp {
  Barrier bar;
  uint64_t slots[32];
  uint64_t wide[32][kGatherMax];  // warp_gather's values, by lane
};

struct Block {
  Barrier bar;
  std::vector<Warp> warps;
  std::unique_ptr<unsigned char[]> smem_storage;
  unsigned char* smem = nullptr;
};

// ---- context switches -------------------------------------------------------------------
// On x86-64 a fiber switch saves the callee-saved registers and the floating-point control
// words on the old stack and pops them from the new one (what the System V ABI preserves
// across a call). glibc's swapcontext also saves the signal mask, a system call per switch;
// the emulation switches at every barrier and warp collective, hundreds of thousands of times
// per launch. Elsewhere ucontext does it.
#if defined(__x86_64__) && defined(__linux__) && !defined(RNNKERN_EMU_UCONTEXT)
#define RNNKERN_EMU_FAST_SWITCH 1
extern "C" void rnnkern_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl rnnkern_emu_switch
  .type rnnkern_emu_switch, @function
rnnkern_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size rnnkern_emu_switch, .-rnnkern_emu_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");
#endif

struct Fiber {
  ThreadState ts{};
  ucontext_t ctx{};
  void* sp = nullptr;  // saved stack pointer (fast switch)
  void* mapping = nullptr;
  size_t mapping_bytes = 0;
  State state = State::kRunnable;
  Block* block = nullptr;
};

struct Scheduler {
  ucontext_t main{};
  void* main_sp = nullptr;
  std::vector<std::unique_ptr<Fiber>> fibers;
  Fiber* cur = nullptr;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
};

thread_local Scheduler* tls_sched = nullptr;

Scheduler& sched() {
  if (tls_sched == nullptr || tls_sched->cur == nullptr)
    throw std::logic_error("rnnkern CUDA emulation: a device function ran outside a launch");
  return *tls_sched;
}

// Back to the scheduler; returns when this fiber is scheduled again.
void switch_out() {
  Scheduler& s = sched();
  Fiber* f = s.cur;
#ifdef RNNKERN_EMU_FAST_SWITCH
  rnnkern_emu_switch(&f->sp, s.main_sp);
#else
  swapcontext(&f->ctx, &s.main);
#endif
}

// From the scheduler into fiber f; returns when f switches out or finishes.
void switch_in(Scheduler& s, Fiber* f) {
#ifdef RNNKERN_EMU_FAST_SWITCH
  rnnkern_emu_switch(&s.main_sp, f->sp);
#else
  swapcontext(&s.main, &f->ctx);
#endif
}

int arrive(Barrier& b, int value, int op) {
  Fiber* f = sched().cur;
  if (b.arrived == 0) b.acc = op == 2 ? 1 : 0;
  if (op == 1) b.acc |= value;
  if (op == 2) b.acc &= value;
  if (op == 3) b.acc += value;
  if (++b.arrived == b.size) {
    b.result = b.acc;
    b.arrived = 0;
    for (Fiber* w : b.waiting) w->state = State::kRunnable;
    b.waiting.clear();
    return b.result;
  }
  f->state = State::kWaiting;
  b.waiting.push_back(f);
  switch_out();
  // b.result is still this round's: the next round cannot complete before this fiber arrives.
  return b.result;
}

void trampoline() {
  Scheduler& s = *tls_sched;
  try {
    (*s.body)();
  } catch (...) {
    if (!s.error) s.error = std::current_exception();
  }
  s.cur->state = State::kDone;
#ifdef RNNKERN_EMU_FAST_SWITCH
  switch_out();  // never resumed
  __builtin_trap();
#endif
  // (ucontext) returning resumes uc_link: the scheduler
}

std::mutex device_mutex;
Device the_device{0, 4, 232448, 9, 0, 0};  // 232448 B: an H100's opt-in shared memory per block
uint64_t launches = 0;  // launches so far (with the seed, the random rounds of each launch)

// xorshift64* (Vigna): enough randomness for shuffling schedules, reproducible from a seed.
struct Rng {
  uint64_t s;
  uint64_t next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 0x2545F4914F6CDD1Dull;
  }
  uint64_t below(uint64_t n) { return next() % n; }
};

cudaError_t last_error = cudaSuccess;

}  // namespace

ThreadState* current() { return &sched().cur->ts; }

int block_barrier(int value, int op) {
  Scheduler& s = sched();
  return arrive(s.cur->block->bar, value, op);
}

uint64_t warp_exchange(uint64_t value, int src_lane, int op) {
  Scheduler& s = sched();
  Fiber* f = s.cur;
  const int lane = static_cast<int>(f->ts.thread_idx.x % 32);
  Warp& w = f->block->warps[f->ts.thread_idx.x / 32];
  if (op == kSync) {
    arrive(w.bar, 0, 0);
    return 0;
  }
  w.slots[lane] = value;
  arrive(w.bar, 0, 0);
  uint64_t out = 0;
  if (op == kBallot) {
    for (int l = 0; l < 32; ++l) out |= (w.slots[l] != 0 ? 1ull : 0ull) << l;
  } else {
    out = w.slots[src_lane];
  }
  arrive(w.bar, 0, 0);  // nobody writes a slot again before every lane has read
  return out;
}

void warp_gather(const uint64_t* values, int n, uint64_t* out) {
  if (n < 1 || n > kGatherMax)
    throw std::logic_error("rnnkern CUDA emulation: warp_gather of " + std::to_string(n) +
                           " values per lane (1 to " + std::to_string(kGatherMax) + ")");
  Scheduler& s = sched();
  Fiber* f = s.cur;
  const int lane = static_cast<int>(f->ts.thread_idx.x % 32);
  Warp& w = f->block->warps[f->ts.thread_idx.x / 32];
  for (int i = 0; i < n; ++i) w.wide[lane][i] = values[i];
  arrive(w.bar, 0, 0);
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < n; ++i) out[l * n + i] = w.wide[l][i];
  arrive(w.bar, 0, 0);  // nobody writes again before every lane has read
}

void yield() { switch_out(); }

void check_full_mask(unsigned int mask, const char* what) {
  if (mask != 0xffffffffu)
    throw std::logic_error(std::string("rnnkern CUDA emulation: ") + what +
                           " with a partial mask is not emulated");
}

void check_aligned(const void* p, size_t align, const char* what) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a % align == 0) return;
  const ThreadState& ts = sched().cur->ts;
  char addr[32];
  std::snprintf(addr, sizeof addr, "%#llx", static_cast<unsigned long long>(a));
  throw std::logic_error("rnnkern CUDA emulation: block " + std::to_string(ts.block_idx.x) +
                         " thread " + std::to_string(ts.thread_idx.x) + ": misaligned " + what +
                         " at " + addr + " (" + std::to_string(a % align) + " bytes past a " +
                         std::to_string(align) + "-byte boundary; the GPU faults on it)");
}

void run_grid(int blocks, int threads, size_t smem, const std::function<void()>& body) {
  if (tls_sched != nullptr)
    throw std::logic_error("rnnkern CUDA emulation: a launch from inside a launch");
  if (blocks < 1 || threads < 32 || threads % 32 != 0)
    throw std::invalid_argument("rnnkern CUDA emulation: blocks >= 1 and threads a multiple "
                                "of 32 expected, got " + std::to_string(blocks) + " x " +
                                std::to_string(threads));  // fmt: skip
  Scheduler s;
  s.body = &body;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  std::vector<std::unique_ptr<Block>> grid;
  struct Cleanup {  // stacks are unmapped whatever happens
    Scheduler& s;
    ~Cleanup() {
      for (auto& f : s.fibers)
        if (f->mapping) munmap(f->mapping, f->mapping_bytes);
      tls_sched = nullptr;
    }
  } cleanup{s};
  for (int b = 0; b < blocks; ++b) {
    auto blk = std::make_unique<Block>();
    blk->bar.size = threads;
    blk->warps.resize(threads / 32);
    for (Warp& w : blk->warps) w.bar.size = 32;
    // Shared memory starts as 0xff bytes (float NaN, int -1): a kernel that reads shared
    // memory it never wrote gets NaN into its results instead of a lucky zero. Canaries on
    // both sides (kCanaryBytes).
    blk->smem_storage.reset(new unsigned char[smem + 2 * kCanaryBytes + 16]);
    unsigned char* base = reinterpret_cast<unsigned char*>(
        (reinterpret_cast<uintptr_t>(blk->smem_storage.get()) + 15) & ~uintptr_t(15));
    std::memset(base, kCanary, kCanaryBytes);
    blk->smem = base + kCanaryBytes;
    std::memset(blk->smem, 0xff, smem);
    std::memset(blk->smem + smem, kCanary, kCanaryBytes);
    for (int t = 0; t < threads; ++t) {
      auto f = std::make_unique<Fiber>();
      f->block = blk.get();
      f->ts.thread_idx.x = static_cast<unsigned>(t);
      f->ts.block_idx.x = static_cast<unsigned>(b);
      f->ts.grid_dim.x = static_cast<unsigned>(blocks);
      f->ts.block_dim.x = static_cast<unsigned>(threads);
      f->ts.smem = blk->smem;
      f->mapping_bytes = kStackBytes + page;
      f->mapping = mmap(nullptr, f->mapping_bytes, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (f->mapping == MAP_FAILED) {
        f->mapping = nullptr;
        throw std::runtime_error("rnnkern CUDA emulation: cannot map a thread stack");
      }
      mprotect(f->mapping, page, PROT_NONE);  // guard page (stacks grow down)
#ifdef RNNKERN_EMU_FAST_SWITCH
      // The first switch in pops this frame: the control words, six zero registers, and
      // trampoline as the return address (trampoline starts with the stack as after a call).
      // Return address slot: 16-byte aligned, so that after `ret` pops it rsp is 8 mod 16.
      const uintptr_t ret_slot =
          (reinterpret_cast<uintptr_t>(f->mapping) + f->mapping_bytes - 32) & ~uintptr_t(15);
      uint64_t* frame = reinterpret_cast<uint64_t*>(ret_slot) - 7;
      uint32_t mxcsr = 0;
      uint16_t fpucw = 0;
      asm volatile("stmxcsr %0" : "=m"(mxcsr));
      asm volatile("fnstcw %0" : "=m"(fpucw));
      frame[0] = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpucw) << 32);
      for (int r = 1; r <= 6; ++r) frame[r] = 0;
      frame[7] = reinterpret_cast<uint64_t>(&trampoline);
      f->sp = frame;
#else
      getcontext(&f->ctx);
      f->ctx.uc_stack.ss_sp = static_cast<unsigned char*>(f->mapping) + page;
      f->ctx.uc_stack.ss_size = kStackBytes;
      f->ctx.uc_link = &s.main;
      makecontext(&f->ctx, trampoline, 0);
#endif
      s.fibers.push_back(std::move(f));
    }
    grid.push_back(std::move(blk));
  }
  tls_sched = &s;
  uint64_t seed = 0;
  {
    std::lock_guard<std::mutex> lock(device_mutex);
    seed = the_device.schedule_seed;
    if (seed != 0) seed = seed * 0x9E3779B97F4A7C15ull + ++launches;
  }
  Rng rng{seed | 1};
  std::vector<size_t> order(s.fibers.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::vector<char> chosen(grid.size(), 1);
  size_t alive = s.fibers.size();
  while (alive > 0) {
    bool ran = false, any_runnable = false;
    if (seed != 0) {  // a random half of the blocks (at least one), threads in random order
      for (auto& c : chosen) c = static_cast<char>(rng.next() & 1);
      chosen[rng.below(chosen.size())] = 1;
      for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[rng.below(i)]);
    }
    for (size_t i : order) {
      Fiber* f = s.fibers[i].get();
      if (f->state != State::kRunnable) continue;
      any_runnable = true;
      if (!chosen[f->ts.block_idx.x]) continue;
      s.cur = f;
      switch_in(s, f);
      s.cur = nullptr;
      ran = true;
      if (f->state == State::kDone) --alive;
      if (s.error) std::rethrow_exception(s.error);
    }
    if (!ran && any_runnable) continue;  // this round's blocks all wait: draw others
    if (!ran) {
      for (size_t b = 0; b < grid.size(); ++b) {
        const Block& blk = *grid[b];
        if (blk.bar.arrived > 0)
          throw std::runtime_error(
              "rnnkern CUDA emulation: deadlock: block " + std::to_string(b) + " waits at "
              "__syncthreads with " + std::to_string(blk.bar.arrived) + " of " +
              std::to_string(threads) + " threads arrived (the others finished or wait at "
              "another barrier)");  // fmt: skip
      }
      throw std::runtime_error("rnnkern CUDA emulation: deadlock: every live thread waits at "
                               "a warp collective that not all 32 lanes reach");
    }
  }
  for (size_t b = 0; b < grid.size(); ++b) {
    const unsigned char* m = grid[b]->smem;
    for (size_t i = 0; i < kCanaryBytes; ++i) {
      if (m[-1 - static_cast<std::ptrdiff_t>(i)] != kCanary || m[smem + i] != kCanary)
        throw std::runtime_error(
            "rnnkern CUDA emulation: block " + std::to_string(b) + " wrote outside its " +
            std::to_string(smem) + " bytes of dynamic shared memory (" +
            (m[smem + i] != kCanary ? "past the end" : "before the start") + ")");
    }
  }
}

Device device() {
  std::lock_guard<std::mutex> lock(device_mutex);
  return the_device;
}

void configure(int sms, int smem_optin, uint64_t schedule_seed) {
  if (sms < 1 || smem_optin < 1024)
    throw std::invalid_argument("rnnkern CUDA emulation: sms must be >= 1 and smem_optin >= "
                                "1024 bytes, got " + std::to_string(sms) + " and " +
                                std::to_string(smem_optin));  // fmt: skip
  std::lock_guard<std::mutex> lock(device_mutex);
  the_device.ordinal += 1;
  the_device.sms = sms;
  the_device.smem_optin = smem_optin;
  the_device.schedule_seed = schedule_seed;
}

void convert_16bit(const float* src, uint16_t* bits, float* back, int64_t n, int dtype) {
  for (int64_t i = 0; i < n; ++i) {
    if (dtype == 1) {
      const __half h = __float2half_rn(src[i]);
      bits[i] = h.bits;
      back[i] = __half2float(h);
    } else {
      const __nv_bfloat16 h = __float2bfloat16_rn(src[i]);
      bits[i] = h.bits;
      back[i] = __bfloat162float(h);
    }
  }
}

void launch_divergent_barrier() {
  run_grid(2, 64, 0, [] {
    if (blockIdx.x == 1 && threadIdx.x == 0) return;  // skips the barrier below
    __syncthreads();
  });
}

void launch_smem_overrun() {
  run_grid(1, 32, 256, [] {
    if (threadIdx.x == 0) current()->smem[256] = 1;
  });
}

void launch_misaligned_load() {
  alignas(16) static float buf[8] = {};
  run_grid(1, 32, 0, [] {
    if (threadIdx.x == 5) (void)__ldcg(reinterpret_cast<const float4*>(buf + 1));
  });
}

}  // namespace rnnkern_emu

// ---- runtime API --------------------------------------------------------------------------

const char* cudaGetErrorName(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorCooperativeLaunchTooLarge: return "cudaErrorCooperativeLaunchTooLarge";
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument (emulated device)";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulated device)";
    case cudaErrorCooperativeLaunchTooLarge:
      return "too many blocks in cooperative launch (emulated device)";
  }
  return "unknown error";
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = rnnkern_emu::last_error;
  rnnkern_emu::last_error = cudaSuccess;
  return e;
}

cudaError_t cudaGetDevice(int* device) {
  *device = rnnkern_emu::device().ordinal;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  const rnnkern_emu::Device d = rnnkern_emu::device();
  if (device != d.ordinal) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = d.sms; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.smem_optin; return cudaSuccess;
    case cudaDevAttrCooperativeLaunch: *value = 1; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = d.major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = d.minor; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void*) {
  attr->sharedSizeBytes = 0;  // the kernels declare no static shared memory
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int value) {
  return value <= rnnkern_emu::device().smem_optin ? cudaSuccess : cudaErrorInvalidValue;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int threads,
                                                          size_t smem) {
  *blocks = (threads <= 1024 && smem <= static_cast<size_t>(rnnkern_emu::device().smem_optin))
                ? 1
                : 0;
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

cudaError_t emulated_launch(int blocks, int threads, size_t smem,
                            const std::function<void()>& body) {
  const rnnkern_emu::Device d = rnnkern_emu::device();
  if (blocks > d.sms) return cudaErrorCooperativeLaunchTooLarge;
  if (smem > static_cast<size_t>(d.smem_optin)) return cudaErrorInvalidValue;
  rnnkern_emu::run_grid(blocks, threads, smem, body);
  return cudaSuccess;
}
