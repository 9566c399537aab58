// The sampling rule of rnnkern/sampling.py for the C++ decoder's generate loop: the rule's
// arithmetic is csrc/common/sampling_rule.h (shared with the CUDA decoder); this file ranks
// with std::partial_sort and runs the steps over one row.
#include <algorithm>
#include <cstdint>

#include "../common/sampling_rule.h"
#include "api.h"

namespace rnnkern_cpu {

double uniform(uint64_t seed, uint64_t stream, uint64_t step) {
  return rnnkern_rule::uniform(seed, stream, step);
}

int64_t sample_row(const float* logits, int64_t V, double temperature, int64_t top_k,
                   double top_p, uint64_t seed, uint64_t stream, uint64_t step, double* w,
                   int32_t* order) {
  using namespace rnnkern_rule;
  // 1. weights e = exp(z - max z), z = logits / temperature.
  double zmax = -HUGE_VAL;
  for (int64_t v = 0; v < V; ++v) {
    if (!scaled_logit(logits[v], temperature, &w[v])) return -1;
    zmax = w[v] > zmax ? w[v] : zmax;
  }
  if (zmax == -HUGE_VAL) return -1;
  for (int64_t v = 0; v < V; ++v) w[v] = weight_of(w[v], zmax);

  // 2-4. top-k / top-p over the ranking; dropped tokens get weight 0.
  const bool by_k = top_k > 0 && top_k < V, by_p = top_p < 1.0;
  if (by_k || by_p) {
    for (int64_t v = 0; v < V; ++v) order[v] = (int32_t)v;
    const int64_t keep = by_k ? top_k : V;
    std::partial_sort(order, order + keep, order + V,
                      [w](int32_t x, int32_t y) { return ranks_before(w, x, y); });
    const int64_t last = last_kept(w, order, keep, top_p);
    for (int64_t j = last + 1; j < V; ++j) w[order[j]] = 0.0;
  }

  // 5. inverse CDF in ascending id.
  return inverse_cdf(w, V, uniform(seed, stream, step));
}

}  // namespace rnnkern_cpu
