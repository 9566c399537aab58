// Kernels for any CPU (x86-64 baseline SSE2, aarch64 NEON): 16-byte vectors.
#include <omp.h>

#include <cstdint>
#include <cstdlib>

#include "api.h"

namespace rnnkern_cpu {
namespace generic {
#define RK_VEC_BYTES 16
#include "kernels.h"
#undef RK_VEC_BYTES
}  // namespace generic

const Kernels kernels_generic = {"generic",         generic::forward_f32,  generic::forward_f64,
                                 generic::backward_f32, generic::backward_f64, generic::gemm_f32, generic::gemm_f64,
                                 generic::decoder_pack, generic::decoder_free, generic::decoder_step, generic::generate};
}  // namespace rnnkern_cpu
