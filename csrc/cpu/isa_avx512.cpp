// Kernels for x86-64 CPUs with AVX-512 (F, BW, VL) and FMA: 64-byte vectors. Same scheme as
// isa_avx2.cpp; bindings.cpp picks this table only when the CPU reports the features.
#if defined(__x86_64__) || defined(_M_X64)
#include <omp.h>

#include <cstdint>
#include <cstdlib>

#include "api.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
namespace rnnkern_cpu {
namespace avx512 {
#define RK_VEC_BYTES 64
#include "kernels.h"
#undef RK_VEC_BYTES
}  // namespace avx512
}  // namespace rnnkern_cpu
#pragma GCC pop_options

namespace rnnkern_cpu {
const Kernels kernels_avx512 = {"avx512",         avx512::forward_f32,  avx512::forward_f64,
                                avx512::backward_f32, avx512::backward_f64, avx512::gemm_f32, avx512::gemm_f64, avx512::decoder_pack, avx512::decoder_free, avx512::decoder_step,
                                avx512::generate};
}  // namespace rnnkern_cpu
#endif
