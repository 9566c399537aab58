// The sampling rule of rnnkern/sampling.py (the specification; read its module docstring), in
// C++ for the decoder's generate loop. Same operations in the same order, float64 throughout.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "api.h"

namespace rnnkern_cpu {

static inline uint64_t mix(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

double uniform(uint64_t seed, uint64_t stream, uint64_t step) {
  uint64_t z = mix(mix(mix(seed) ^ stream) ^ step);
  return (double)(z >> 11) * (1.0 / 9007199254740992.0);  // 2^-53
}

int64_t sample_row(const float* logits, int64_t V, double temperature, int64_t top_k,
                   double top_p, uint64_t seed, uint64_t stream, uint64_t step, double* w,
                   int32_t* order) {
  // 1. weights e = exp(z - max z), z = logits / temperature.
  double zmax = -INFINITY;
  for (int64_t v = 0; v < V; ++v) {
    double z = (double)logits[v] / temperature;
    if (std::isnan(z) || z == INFINITY) return -1;
    w[v] = z;
    zmax = z > zmax ? z : zmax;
  }
  if (zmax == -INFINITY) return -1;
  for (int64_t v = 0; v < V; ++v) w[v] = std::exp(w[v] - zmax);

  // 2-4. top-k / top-p over the ranking (weight descending, lower id first on ties). The
  // candidates are marked by negating their weight's sign bit in a second pass below; here
  // `order` holds the ranking.
  const bool by_k = top_k > 0 && top_k < V, by_p = top_p < 1.0;
  if (by_k || by_p) {
    for (int64_t v = 0; v < V; ++v) order[v] = (int32_t)v;
    auto before = [w](int32_t x, int32_t y) { return w[x] > w[y] || (w[x] == w[y] && x < y); };
    const int64_t keep = by_k ? top_k : V;
    std::partial_sort(order, order + keep, order + V, before);
    int64_t last = keep - 1;
    if (by_p) {
      double cum = 0.0;
      for (int64_t j = 0; j < keep; ++j) cum += w[order[j]];
      const double threshold = top_p * cum;
      double run = 0.0;
      for (int64_t j = 0; j < keep; ++j) {
        run += w[order[j]];
        if (run >= threshold) {
          last = j;
          break;
        }
      }
    }
    // Dropped tokens get weight 0 (x + 0.0 == x, so the sums below are unchanged).
    for (int64_t j = last + 1; j < V; ++j) w[order[j]] = 0.0;
  }

  // 5. inverse CDF in ascending id.
  double total = 0.0;
  for (int64_t v = 0; v < V; ++v) total += w[v];
  const double r = uniform(seed, stream, step) * total;
  double run = 0.0;
  int64_t last_nonzero = -1;
  for (int64_t v = 0; v < V; ++v) {
    run += w[v];
    if (run > r) return v;
    if (w[v] > 0) last_nonzero = v;
  }
  return last_nonzero;
}

}  // namespace rnnkern_cpu
