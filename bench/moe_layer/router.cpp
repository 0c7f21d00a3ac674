#include "bench/moe_layer/router.h"

#include <cmath>

#include "csrc/dtype.h"

namespace ferry::moe {

Router::Router(const LayerShape& shape) : shape_(shape), w_(router_weights(shape)) {}

void Router::route(const uint16_t* x, int num_tokens, int32_t* indices, float* weights) const {
  const int E = shape_.num_experts, H = shape_.hidden, K = shape_.top_k;
  std::vector<double> logits(E);
  std::vector<uint8_t> taken(E);
  for (int t = 0; t < num_tokens; ++t) {
    std::fill(logits.begin(), logits.end(), 0.0);
    for (int h = 0; h < H; ++h) {
      const double xv = ep::dtype::bf16_to_f32(x[size_t(t) * H + h]);
      if (xv == 0.0) continue;
      const float* row = &w_[size_t(h) * E];
      for (int e = 0; e < E; ++e) logits[e] += xv * double(row[e]);
    }
    // k passes of a max search: k <= 8, and the strict comparison keeps the lowest id of a tie.
    std::fill(taken.begin(), taken.end(), 0);
    int32_t* idx = indices + size_t(t) * K;
    for (int k = 0; k < K; ++k) {
      int best = -1;
      for (int e = 0; e < E; ++e)
        if (!taken[e] && (best < 0 || logits[e] > logits[best])) best = e;
      taken[best] = 1;
      idx[k] = best;
    }
    float* w = weights + size_t(t) * K;
    const float top = float(logits[idx[0]]);
    float sum = 0.0f;
    for (int k = 0; k < K; ++k) sum += (w[k] = std::exp(float(logits[idx[k]]) - top));
    for (int k = 0; k < K; ++k) w[k] /= sum;
  }
}

}  // namespace ferry::moe
