// The dense reference of the layer: every token of a group through its top-k experts with plain fp64
// loops, no all-to-all, no micro-batches, computed from the model definition alone (model.h).
//
// Exact where the arithmetic allows. The layer stores g, u, a and y in bf16 (model.h); the
// reference computes each in fp64 from the previous stored values, bounds how far the layer's fp32
// result can be from it, and rounds to bf16 as the layer does. When every value within that bound
// rounds to the same bf16 value, the layer's stored value is exactly the reference's (the usual
// case); otherwise the reference carries the spread of the bf16 values the interval reaches. The
// bounds: fp32 sums of n products gamma_n * sum|products| (gamma_n = n u / (1 - n u), u = 2^-24),
// silu(g) * u in fp32 6 u (|silu'| <= 1.1 carries g's spread), each times 1.5. What stays inexact
// is combine's: Ferry's partials and their sum rounded to out_dtype
// (ep::reference::combine_tolerance of the all-to-all config) and the fp32 top-k weights (16 u).
// The router's logits are exact (model.h): expert choice and per-expert row counts are checked
// exactly.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "bench/moe_layer/model.h"

namespace ferry::moe {

struct ReferenceOutput {
  int num_tokens = 0;
  std::vector<uint16_t> x;        // [tokens][hidden] bf16: the all-reduced hidden states, exact
  std::vector<int32_t> indices;   // [tokens][top_k] the experts each token must reach
  std::vector<double> out;        // [tokens][hidden]
  std::vector<double> tolerance;  // [tokens][hidden] allowed |got - out|
};

// Tokens [range.begin, range.end) of attention-TP group `group` (the whole step by default).
ReferenceOutput reference_layer(const LayerShape& shape, int group);

// Rows rank `rank`'s local experts must receive in one step of micro-batch `b` of
// `num_micro_batches`: every group's tokens of that micro-batch routed there.
std::vector<int32_t> reference_expert_counts(const LayerShape& shape, int rank, int num_micro_batches, int b);

// Empty when every element of out_tokens ([num_tokens][hidden] out_dtype, tokens `first` ..
// `first + num_tokens - 1` of the group) lies within the tolerance; otherwise up to 8 offending
// elements (rank, token, element, got, want, tolerance) and the count of all of them.
std::string compare_output(const LayerShape& shape, const ReferenceOutput& want, int rank, int first,
                           const void* out_tokens, int num_tokens);

}  // namespace ferry::moe
