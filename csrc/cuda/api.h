// rnnkern._cuda: the C++ interface between the CUDA kernels (recurrence.cu, compiled by nvcc)
// and the Python bindings (bindings.cpp, compiled by the host C++ compiler). No CUDA or torch
// headers here: buffers are raw device addresses, the stream is an opaque handle
// (torch.cuda.current_stream().cuda_stream), so the bindings build without either.
//
// Legend for shapes: T time steps, B batch, H hidden, P state size (proj_size or H),
// G gates (LSTM 4: i, f, g, o; GRU 3: r, z, n; RNN 1). "dtype" is the input dtype
// (float32, float16 or bfloat16); states, saved activations and scratch are float32.
#pragma once

#include <cstdint>

namespace rnnkern_cuda {

enum Cell : int { kLSTM = 0, kGRU = 1, kRNNTanh = 2, kRNNRelu = 3 };
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Error codes the kernels write to sync[1] (0 = fine). The launcher never reads them back
// (that would synchronise the stream); rnnkern/backends/cuda.py does after the launch.
enum KernelError : unsigned long long {
  kErrNone = 0,
  kErrBarrierTimeout = 1,  // a grid barrier waited longer than the timeout (deadlock guard)
  kErrBadLength = 2,       // lengths[b] outside [1, T]
  kErrNonFinite = 3,       // generate: a row of logits held NaN or +inf (not fatal, see below)
  kErrBadToken = 4,        // generate: a prime token outside [0, vocab_in) (not fatal)
};

// The training kernels' status words: [0] barrier arrivals of batch group 0, [1] error code,
// [1 + g] arrivals of batch group g >= 1 (recurrence.cu: the groups never wait for each
// other), all zeroed before the launch. A plan has at most kMaxBatchGroups groups.
constexpr int kMaxBatchGroups = 64;
constexpr int kTrainSyncWords = 1 + kMaxBatchGroups;

// Phase tracing (rnnkern.backends.tracing.trace_phases; the phases benchmark). Where
// ForwardArgs / BackwardArgs::trace is not null, thread 0 of every block writes %globaltimer
// (ns) at each of these points of the first trace_steps processing steps, to
// trace[(block * trace_steps + step) * kTracePoints + point], after a block-wide
// synchronisation (so: when the whole block got there). A point a step does not reach keeps
// the caller's zero.
//   forward:  0 step begins (the previous step's barrier passed), 1 first batch chunk of
//             h_{s-1} staged, 2 its matvec done, 3 cells done (every chunk), 4 projection:
//             m_s complete (barrier passed), 5 projection: h_s done
//   backward: 0 step begins, 1 projection: dh + dy complete (barrier passed), 2 cells done
//             (every chunk: dpre written), 3 dpre complete (barrier passed), 4 first batch
//             chunk of dpre staged, 5 dh_{s-1} done (every chunk; the next step begins here)
constexpr int kTracePoints = 6;
// Generation (GenerateArgs::trace) stamps 2L + 3 points per model step instead: 0 step begins,
// 1 + 2l layer l's input from the layer below staged (l >= 1; first batch chunk), 2 + 2l layer
// l done (its projection too; before the barrier of barrier mode), 2L + 1 logits written (the
// top state staged, the head's rows done), 2L + 2 token sampled (the steps that sample).
// (Host and device code both call it: __host__ __device__ where nvcc compiles this header.)
#if defined(__CUDACC__)
#define RNNKERN_HOST_DEVICE __host__ __device__
#else
#define RNNKERN_HOST_DEVICE
#endif
RNNKERN_HOST_DEVICE constexpr int generate_trace_points(int L) { return 2 * L + 3; }

struct ForwardArgs {
  int cell, dtype, T, B, H, P, reverse, save;
  const void* gx;           // [T, B, G*H] dtype, time order
  const float* h0;          // [B, P]
  const float* c0;          // [B, H] (lstm) or null
  const void* w_hh;         // [G*H, P] dtype
  const void* b_hh;         // [G*H] dtype or null
  const void* w_hr;         // [P, H] dtype (lstm projection) or null
  const int64_t* lengths;   // [B] in [1, T] or null (all T)
  void* y;                  // out [T, B, P] dtype, time order, zero past each length
  float* h_n;               // out [B, P]
  float* c_n;               // out [B, H] (lstm) or null
  float* hs;                // out save: [T+1, B, P] h0..h_T (processing order); else [2, B, P]
  float* aux;               // out lstm: save [T+1, B, H] c0..c_T, else [2, B, H];
                            //     gru: save [T, B, H] W_hn h + b_hn, else null; rnn: null
  float* gates;             // out save (lstm, gru): [T, B, G*H] activated gates, else null
  float* m;                 // scratch lstm projection: [B, H] o * tanh(c), else null
  unsigned long long* sync; // [kTrainSyncWords] zeroed before the launch (see above)
  int tf32;                 // float32: TF32 products allowed (the mma matvec may run)
  long long* trace;         // phase timestamps (kTracePoints above) or null
  int trace_steps;          // processing steps traced: the first ones
};

struct BackwardArgs {
  int cell, dtype, T, B, H, P, reverse;
  const float* hs;          // [T+1, B, P] saved h0..h_T (processing order)
  const float* aux;         // lstm [T+1, B, H] c0..c_T; gru [T, B, H] W_hn h + b_hn; rnn null
  const float* gates;       // lstm/gru [T, B, G*H] activated gates; rnn null
  const void* w_t;          // [P, G*H] dtype: W_hhᵀ, so a state unit's column is one row
  const void* wr_t;         // [H, P] dtype: W_hrᵀ (lstm projection) or null
  const int64_t* lengths;   // [B] or null
  const void* dy;           // [T, B, P] dtype, time order
  const float* dh_n;        // [B, P]
  const float* dc_n;        // [B, H] (lstm) or null
  float* dgx;               // out [T, B, G*H] time order: gradient of the pre-activations
  float* dgh;               // out gru: [T, B, G*H] gradient of W_hh h + b_hh (n part * r); else null
  float* dh_proj;           // out projection: [T, B, P] gradient of h_t (0 past lengths); else null
  float* dh0;               // out [B, P]; the running dh when not in shared memory
                            //   (LaunchInfo::running_in_smem)
  float* dc0;               // out [B, H] (lstm; the running dc when not in shared memory) or null
  float* dpre;              // scratch [2, B, G*H]: recurrent pre-activation gradients, 2 slots
                            //   (bfloat16 in its first half in bfloat16 mma plans)
  float* dht;               // scratch projection: [B, P] dh + dy of the current step; else null
  float* dloc;              // scratch gru: [B, H] dh_total * z when not in shared memory; else null
  unsigned long long* sync; // [kTrainSyncWords] zeroed before the launch
  int tf32;                 // float32: TF32 products allowed (the mma matvec may run)
  long long* trace;         // phase timestamps (kTracePoints above) or null
  int trace_steps;          // processing steps traced: the first ones (from s = T - 1 down)
};

// The matrices of one layer for generation, as the Decoder packs them (device addresses; an
// array of L of these lives in device memory). wdtype is the element type of the matrices.
struct LayerWeights {
  const void* w_ih;   // [G*H, K] wdtype, K = I for layer 0 (unused with a token table), else P
  const void* w_hh;   // [G*H, P] wdtype
  const float* b_ih;  // [G*H] or null
  const float* b_hh;  // [G*H] or null
  const void* w_hr;   // [P, H] wdtype (lstm projection) or null
};

// Whole-sequence generation in one launch (generate.cu): `feed` model steps on given inputs,
// then `steps` sampled tokens, each fed back as the next step's input. Model steps run:
// feed + steps - 1 (feed when steps == 0), so the state afterwards has consumed the fed inputs
// and every sampled token but the last, as rnnkern.Decoder.generate specifies.
struct GenerateArgs {
  int cell, wdtype;             // wdtype: kFloat32 or kBFloat16 (the streamed matrices)
  int proj;                     // 1: LSTM with projection (every layer has w_hr)
  int L, B, I, H, P, V;         // V: head outputs (0: no head, nothing sampled)
  int vocab_in;                 // rows of `table` (0: no table; layer 0 reads x)
  const LayerWeights* layers;   // [L] in device memory
  const float* table;           // [vocab_in, G*H] float32: embedding @ W_ih0ᵀ + b_ih0, or null
  const void* head_w;           // [V, P] wdtype or null
  const float* head_b;          // [V] or null
  float* h;                     // [2, L, B, P] ping-pong; slot `parity` is the state on entry,
  int parity;                   //   slot parity ^ (model steps & 1) the state on exit
  float* c;                     // [L, B, H] lstm cell state, in place; else null
  float* m;                     // [B, H] scratch for the projection; else null
  float* logits;                // [B, V] out: the logits of the last model step (V > 0)
  int feed;                     // model steps on given inputs (>= 1)
  const int64_t* prime;         // [B, feed] token ids (with a table); else null
  const float* x;               // [B, I] layer-0 input (no table, feed == 1); else null
  int steps;                    // tokens to sample (0: none; needs a table and a head)
  int64_t* out;                 // [B, steps] sampled tokens
  double temperature, top_p;    // the sampling rule of rnnkern/sampling.py
  int top_k;
  uint64_t seed, first_step;    // token j of stream b: uniform(seed, b, first_step + j)
  unsigned long long* sync;     // [4]: [0] barrier arrivals (zeroed by the launcher);
                                //   [1] abort: a fatal error (a wait past the timeout), which
                                //   stops every block; [2] the first non-fatal error (the
                                //   streams went on with token 0), [3] its row. [1..3] are
                                //   zero before the first launch and cleared by the caller
                                //   once it has reported them.
  // How blocks wait for each other's results (generate.cu explains both): 0 grid barriers,
  // 1 flag-carrying words. Flags mode exchanges through these u64 words {float, tag}:
  int flags;
  int carry;                    // 1: allow forming recurrent parts a step early (generate.cu)
  int spin_sleep_ns;            // flags mode: pause between polls of a word not yet written
                                //   (0: poll back to back; a knob to measure L2 contention)
  uint64_t tag_base;            // tags tag_base .. tag_base + model steps * (2L + 1) - 1 are
                                //   this launch's: >= 1, below 2^32, never used before on
                                //   these buffers (zeroed at allocation)
  unsigned long long* xh;       // [2, L, B, P] states (flags mode)
  unsigned long long* xm;       // [L, B, H] projection inputs (flags mode, projection)
  unsigned long long* xl;       // [B, V] logits (flags mode, V > 0)
  long long* trace;             // phase timestamps (generate_trace_points above) or null
  int trace_steps;              // model steps traced: the first ones
};

struct GenerateInfo {
  int blocks, threads;
  int units_per_block;    // hidden units (all their gates) per block, every layer
  int state_per_block;    // projection outputs per block
  int head_per_block;     // head rows (logits) per block
  int batch_chunk;        // batch rows staged at a time in the matrix-vector products
  int sample_warps;       // streams each block samples at a time (one warp each)
  int weights_in_smem;    // 1: every matrix slice resident in shared memory; 0: read via L2
  int flags;              // 1: flag-carrying exchange; 0: grid barriers
  int carry;              // 1: recurrent parts carried a step early
  int64_t smem_bytes;
};

// How a launch was laid out (returned to Python for tests and benchmark reports).
struct LaunchInfo {
  int blocks;           // grid size (at most one block per SM)
  int threads;          // threads per block
  int units_per_block;  // hidden units (all their gates) each block owns
  int state_per_block;  // units of the P-sized state each block owns
  int batch_chunk;      // batch rows staged in shared memory at a time
  int weights_in_smem;  // 1: recurrent weights resident in shared memory; 0: read from L2
  int64_t smem_bytes;   // dynamic shared memory per block
  int batch_groups;     // the batch is split into this many groups of rows (1: not split)
  int batch_per_group;  // rows per group (the last may have fewer)
  int running_in_smem;  // backward: 1 when the running dh / dc of the block's rows live in
                        //   shared memory (else in dh0, dc0, dloc); forward: 0
  int matvec;           // 0: simple, 1: tiled (float32 FMAs), 2: mma (bfloat16 tensor cores)
};

struct DeviceInfo {
  int device, sms, smem_optin, cooperative, major, minor;
};

// Both launchers run on the current CUDA device, enqueue one cooperative kernel on `stream`
// and throw std::runtime_error on any CUDA error (checked after every call and the launch).
// With debug, they synchronise the stream afterwards so asynchronous faults surface here.
LaunchInfo layer_forward(const ForwardArgs& a, void* stream, int64_t timeout_ns, bool debug);
LaunchInfo layer_backward(const BackwardArgs& a, void* stream, int64_t timeout_ns, bool debug);
// The plan a launch would use, without launching (tests, supports()).
LaunchInfo plan_forward(int cell, int dtype, int B, int H, int P, bool proj, bool tf32);
LaunchInfo plan_backward(int cell, int dtype, int B, int H, int P, bool proj, bool tf32);
// Enqueues one cooperative launch on `stream` (it first zeroes sync[0] there); returns the
// number of model steps it runs. Errors found by the kernel go to sync[1..3], read by the
// caller.
int64_t generate(const GenerateArgs& a, void* stream, int64_t timeout_ns, bool debug,
                 GenerateInfo* info);
// The layout a generate launch with these arguments would use on a device with `sms`
// multiprocessors and `smem_budget` bytes of dynamic shared memory per block: host code only,
// no CUDA call (tests without a GPU; GenerateInfo of a real launch comes from generate()).
GenerateInfo plan_generate_on(const GenerateArgs& a, int sms, int64_t smem_budget);
DeviceInfo device_info();
// Which dtypes this build instantiated (the compile check may build a subset).
bool dtype_compiled(int dtype);

}  // namespace rnnkern_cuda
