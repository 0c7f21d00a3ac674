// The layer's router, as a serving stack runs it before dispatch: logits, top-k, and the
// renormalised top-k softmax weights that dispatch carries and combine applies.
#pragma once
#include <cstdint>
#include <vector>

#include "bench/moe_layer/model.h"

namespace ferry::moe {

class Router {
 public:
  explicit Router(const LayerShape& shape);

  // x: [num_tokens][hidden] bf16 bits. indices/weights: [num_tokens][top_k]. Logits accumulate in
  // fp64, exact for the model's grid values; ties go to the lower expert id; the weights are a
  // softmax over the selected logits in fp32.
  void route(const uint16_t* x, int num_tokens, int32_t* indices, float* weights) const;

 private:
  LayerShape shape_;
  std::vector<float> w_;  // [hidden][num_experts]
};

}  // namespace ferry::moe
