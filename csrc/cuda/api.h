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
};

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
  unsigned long long* sync; // [2] zeroed before the launch: barrier arrivals, error code
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
  float* dh0;               // out [B, P]; also the running dh during the sweep
  float* dc0;               // out [B, H] (lstm; also the running dc) or null
  float* dpre;              // scratch [2, B, G*H]: recurrent pre-activation gradients, 2 slots
  float* dht;               // scratch projection: [B, P] dh + dy of the current step; else null
  float* dloc;              // scratch gru: [B, H] dh_total * z; else null
  unsigned long long* sync; // [2] zeroed before the launch
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
LaunchInfo plan_forward(int cell, int dtype, int B, int H, int P, bool proj);
LaunchInfo plan_backward(int cell, int dtype, int B, int H, int P, bool proj);
DeviceInfo device_info();
// Which dtypes this build instantiated (the compile check may build a subset).
bool dtype_compiled(int dtype);

}  // namespace rnnkern_cuda
