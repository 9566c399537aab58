// The sampling rule of rnnkern/sampling.py (the specification: read its module docstring), in
// C++ for the compiled decoders. csrc/cpu (host code) and csrc/cuda (device code) both include
// this file, so the rule's arithmetic is written once for them: under nvcc every function here
// is __host__ __device__. float64 throughout, the same operations in the same order as the
// specification, so the C++ and CUDA decoders agree with the Python sampler token for token
// (up to the last bit of libm's and CUDA's exp, see the specification).
//
// What is left to the callers is how they rank tokens (std::partial_sort on the host, one
// rank count per token across a warp on the device): any method gives the same ranking,
// because ranks_before is a strict total order.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define RNNKERN_HD __host__ __device__ inline
#else
#define RNNKERN_HD inline
#endif

namespace rnnkern_rule {

// SplitMix64's output function (one increment by the golden gamma, then the finaliser).
RNNKERN_HD uint64_t mix(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The uniform in [0, 1) for (seed, stream, step): 53 random bits, exact in a double.
RNNKERN_HD double uniform(uint64_t seed, uint64_t stream, uint64_t step) {
  const uint64_t z = mix(mix(mix(seed) ^ stream) ^ step);
  return (double)(z >> 11) * (1.0 / 9007199254740992.0);  // 2^-53
}

// Step 1, first half: z = float64(logit) / temperature. Returns false when z is NaN or +inf
// (an error of the whole row); -inf is fine (a weight of 0).
RNNKERN_HD bool scaled_logit(float logit, double temperature, double* z) {
  const double v = (double)logit / temperature;
  *z = v;
  return v == v && v != HUGE_VAL;
}

// Step 1, second half: the unnormalised weight exp(z - max z).
RNNKERN_HD double weight_of(double z, double z_max) { return exp(z - z_max); }

// Step 2: token x (weight wx) ranks before token y (weight wy): weight descending, the lower
// id first on ties.
RNNKERN_HD bool ranks_before(double wx, int32_t x, double wy, int32_t y) {
  return wx > wy || (wx == wy && x < y);
}
RNNKERN_HD bool ranks_before(const double* w, int32_t x, int32_t y) {
  return ranks_before(w[x], x, w[y], y);
}

// Steps 3-4: `order` holds the first `keep` tokens of the ranking (keep = top_k when top-k is
// on, else V); returns the position in `order` of the last token that stays a candidate.
RNNKERN_HD int64_t last_kept(const double* w, const int32_t* order, int64_t keep, double top_p) {
  if (!(top_p < 1.0)) return keep - 1;
  double cum = 0.0;
  for (int64_t j = 0; j < keep; ++j) cum += w[order[j]];
  const double threshold = top_p * cum;
  double run = 0.0;
  for (int64_t j = 0; j < keep; ++j) {
    run += w[order[j]];
    if (run >= threshold) return j;
  }
  return keep - 1;
}

// Step 5's running sums, for callers that search them in parallel: cum[v] = w[0] + ... + w[v]
// summed in ascending id, exactly the sums inverse_cdf forms (cum[V-1] is its total), so the
// first v with cum[v] > u * cum[V-1] is inverse_cdf's token whenever one exists.
RNNKERN_HD void running_sums(const double* w, int64_t V, double* cum) {
  double run = 0.0;
  for (int64_t v = 0; v < V; ++v) {
    run += w[v];
    cum[v] = run;
  }
}

// Step 5: inverse CDF in ascending id over the weights (dropped tokens hold 0.0, and
// x + 0.0 == x, so they change no sum). u is uniform(seed, stream, step).
RNNKERN_HD int64_t inverse_cdf(const double* w, int64_t V, double u) {
  double total = 0.0;
  for (int64_t v = 0; v < V; ++v) total += w[v];
  const double r = u * total;
  double run = 0.0;
  int64_t last_nonzero = -1;
  for (int64_t v = 0; v < V; ++v) {
    run += w[v];
    if (run > r) return v;
    if (w[v] > 0) last_nonzero = v;
  }
  return last_nonzero;
}

}  // namespace rnnkern_rule
