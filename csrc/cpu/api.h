// rnnkern CPU kernels: argument blocks and the per-ISA function table.
//
// Everything here is plain C++ (no torch): tensors stay on the Python side, which passes raw
// pointers, so the extension builds inside pip's isolated environment without torch.
//
// Legend: T time, B batch, I input size, H hidden, P state size (proj or H), G gates
// (LSTM 4: i f g o; GRU 3: r z n; RNN 1), V vocabulary, L layers.
#pragma once

#include <cstdint>

namespace rnnkern_cpu {

enum Cell : int { kLSTM = 0, kGRU = 1, kRNNTanh = 2, kRNNRelu = 3 };

inline int gate_count(int cell) { return cell == kLSTM ? 4 : (cell == kGRU ? 3 : 1); }

// One layer, one direction, forward (contract in rnnkern/backends/base.py). Element type S is
// the dtype of every floating buffer (float32 or float64; other dtypes are converted in Python).
struct ForwardArgs {
  int cell, T, B, H, P;
  const void* gx;          // [T, B, G*H]  x @ W_ih^T + b_ih, time order
  const void* h0;          // [B, P]
  const void* c0;          // [B, H] lstm, else null
  const void* w_hh;        // [G*H, P]
  const void* b_hh;        // [G*H] or null
  const void* w_hr;        // [P, H] or null (lstm projection)
  const int64_t* lengths;  // [B] in [1, T] or null
  int reverse;
  int save;                // 1: hs/aux/gates are the saved layout; 0: hs/aux are 2-slot rings
  void* y;                 // [T, B, P] time order, zero past each length
  void* h_n;               // [B, P]
  void* c_n;               // [B, H] lstm, else null
  void* hs;                // save: [T+1, B, P]; else ring [2, B, P]
  void* aux;               // lstm: save [T+1, B, H] / ring [2, B, H]; gru+save: [T, B, H]; else null
  void* gates;             // save: [T, B, G*H] (lstm/gru), else null
  void* gh;                // scratch [B, G*H]
  void* m;                 // scratch [B, H] (projection only), else null
};

// One layer, one direction, backward. dW_hh, db_hh and dW_hr are one GEMM each in Python from
// dgh, hs and dh_proj, so the kernel owns only the sequential part.
struct BackwardArgs {
  int cell, T, B, H, P;
  const void* hs;          // [T+1, B, P] processing order
  const void* aux;         // lstm [T+1, B, H]; gru [T, B, H]; else null
  const void* gates;       // [T, B, G*H] (lstm/gru), else null
  const void* w_hh;        // [G*H, P]
  const void* w_hr;        // [P, H] or null
  const int64_t* lengths;  // [B] or null
  int reverse;
  const void* dy;          // [T, B, P] time order
  const void* dh_n;        // [B, P]
  const void* dc_n;        // [B, H] lstm, else null
  void* dgx;               // [T, B, G*H] time order (zero past each length)
  void* dgh;               // gru: [T, B, G*H] gradient of W_hh h + b_hh, time order; else null
  void* dh_proj;           // projection: [T, B, P] time order; else null
  void* dh0;               // [B, P]
  void* dc0;               // [B, H] lstm, else null
  void* dh_ring;           // scratch [2, B, P]
  void* dh_total;          // scratch [B, P]
  void* dpre;              // scratch [B, G*H] (gradient of W_hh h + b_hh at the current step)
  void* dm;                // scratch [B, H] (projection only), else null
};

// The products around the recurrence (kernels.h: gemm): C [M, N] = A Bm (+ bias) and
// rowsum [M] = sum over k of A when not null; element type of the layer. A[m, k] is
// a[m * a_rs + k * a_cs] and Bm[k, n] is b[k * b_rs + n * b_cs]; C is row-major [M, N].
struct GemmArgs {
  int M, N, K;
  const void* a;     // A [M, K] by strides
  long a_rs, a_cs;
  const void* b;     // Bm [K, N] by strides
  long b_rs, b_cs;
  const void* bias;  // [N] or null
  void* c;           // [M, N]
  void* rowsum;      // [M] or null
};

// Packed decoder: L stacked unidirectional layers, an optional token table, an optional head.
// Weights are float32 (wdtype 0) or bfloat16 bit patterns (wdtype 1); everything else float32.
struct DecoderArgs {
  int cell, L, B, I, H, P, V;  // I: input size of layer 0; V: head rows (0 without a head)
  int wdtype;
  const uint64_t* w_ih;        // [L] pointers to [G*H, I_l] (layer 0: null when table is used)
  const uint64_t* w_hh;        // [L] pointers to [G*H, P]
  const uint64_t* b_ih;        // [L] pointers to [G*H] float32, or 0
  const uint64_t* b_hh;        // [L] pointers to [G*H] float32, or 0
  const uint64_t* w_hr;        // [L] pointers to [P, H], or 0
  const float* table;          // [vocab_in, G*H] embedding @ W_ih0^T + b_ih0, or null
  int64_t vocab_in;            // rows of table
  const void* head_w;          // [V, P] or null
  const float* head_b;         // [V] or null
  float* h_cur;                // [L, B, P] state read this step
  float* h_next;               // [L, B, P] state written this step (ping-pong with h_cur)
  float* c;                    // [L, B, H] lstm cell state, updated in place; else null
  float* gi;                   // scratch [B, G*H]
  float* gh;                   // scratch [B, G*H]
  float* m;                    // scratch [B, H] (projection)
  float* logits;               // [B, V] output (or [B, P] copy of the top output without head)
};

// The whole generation loop, one call.
struct GenerateArgs {
  int prime_len, steps;
  const int64_t* prime;  // [B, prime_len]
  int64_t* out;          // [B, steps]
  double temperature, top_p;
  int64_t top_k;
  uint64_t seed;
  uint64_t first_step;   // token j is drawn with uniform(seed, b, first_step + j)
  double* weights;       // scratch [B, V]
  int32_t* order;        // scratch [B, V]
  int error_row;         // out: -1, or a row whose logits were NaN / +inf
};

// The sampling rule of rnnkern/sampling.py for one row; returns the token, or -1 when the
// logits hold NaN or +inf or are all -inf. weights / order: scratch [V].
int64_t sample_row(const float* logits, int64_t V, double temperature, int64_t top_k, double top_p,
                   uint64_t seed, uint64_t stream, uint64_t step, double* weights,
                   int32_t* order);
double uniform(uint64_t seed, uint64_t stream, uint64_t step);

struct Kernels {
  const char* name;
  void (*forward_f32)(const ForwardArgs&);
  void (*forward_f64)(const ForwardArgs&);
  void (*backward_f32)(const BackwardArgs&);
  void (*backward_f64)(const BackwardArgs&);
  void (*gemm_f32)(const GemmArgs&);
  void (*gemm_f64)(const GemmArgs&);
  // The decoder's matrices packed for this instruction set (an opaque handle that only this
  // table's decoder_step / generate read, freed by decoder_free).
  void* (*decoder_pack)(const DecoderArgs&);
  void (*decoder_free)(void*);
  // inputs: tokens [B] int64 (layer 0 through the table) or x [B, I] float32
  void (*decoder_step)(const DecoderArgs&, const void* packed, const int64_t* tokens,
                       const float* x, int with_head);
  // returns the number of model steps taken (the h_cur/h_next parity advances by that much)
  int64_t (*generate)(const DecoderArgs&, const void* packed, GenerateArgs&);
};

extern const Kernels kernels_generic;
#if defined(__x86_64__) || defined(_M_X64)
extern const Kernels kernels_avx2;
extern const Kernels kernels_avx512;
#endif

}  // namespace rnnkern_cpu
