// Kernels for x86-64 CPUs with AVX2 and FMA: 32-byte vectors. Compiled with a target pragma
// (not -mavx2 for the whole extension) so the module still loads on older CPUs; bindings.cpp
// picks this table only when the CPU reports both features.
#if defined(__x86_64__) || defined(_M_X64)
#include <omp.h>

#include <cstdint>
#include <cstdlib>

#include "api.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace rnnkern_cpu {
namespace avx2 {
#define RK_VEC_BYTES 32
#include "kernels.h"
#undef RK_VEC_BYTES
}  // namespace avx2
}  // namespace rnnkern_cpu
#pragma GCC pop_options

namespace rnnkern_cpu {
const Kernels kernels_avx2 = {"avx2",         avx2::forward_f32,  avx2::forward_f64,
                              avx2::backward_f32, avx2::backward_f64, avx2::gemm_f32, avx2::gemm_f64, avx2::decoder_pack, avx2::decoder_free, avx2::decoder_step,
                              avx2::generate};
}  // namespace rnnkern_cpu
#endif
