// One MoE layer as a model defines it: shapes, dtypes, parameters and inputs, all drawn from a seed
// so that every rank (and the reference) can regenerate any expert's weights and any group's
// tokens without exchanging them.
//
// The layer (a SwiGLU expert FFN, as Mixtral, DeepSeek and Qwen MoE layers have):
//   x        = sum over the attention-TP group of the members' partial outputs (all-reduce), bf16
//   logits   = x . W_router                           [tokens][experts]
//   top-k    = the k largest logits (ties: lower expert id first)
//   w        = softmax over the k selected logits (renormalised top-k weights), fp32
//   per selected expert e:
//     g | u  = x . W_gate_up[e]    fp32 accumulation, stored bf16   [2 * intermediate]
//     a      = silu(g) * u         fp32, stored bf16                [intermediate]
//     y_e    = a . W_down[e]       fp32 accumulation, stored out_dtype   [hidden]
//   out      = sum_k w_k * y_k     (Ferry's combine: per-rank partials and their sum in fp32)
// The bf16 roundings of g, u and a are those of serving stacks (vLLM's fused MoE keeps its
// intermediate caches in the activation dtype); the host and CUDA paths round alike.
//
// Parameter and token values lie on a grid that bf16 represents exactly: multiples of 1/64 (times a
// power of two for the expert weights). Products of two of them are exact in fp32 and their sums
// exact in fp64, so the router's logits are exact and the layer and the reference select the same
// experts; the TP all-reduce's sums of partials stay exact in bf16 (tp_size <= 8).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "ferry/ferry.h"

namespace ferry::moe {

inline constexpr int kMaxTpSize = 8;  // partials of |k| <= 32 sum to |k| <= 256: exact in bf16

struct LayerShape {
  int world_size = 1;
  int tp_size = 1;          // attention-TP group: ranks g*tp .. g*tp+tp-1 hold the same tokens
  int num_experts = 8;      // global; expert e lives on rank e / (num_experts / world_size)
  int top_k = 2;
  int hidden = 128;
  int intermediate = 64;    // per expert (the FFN width of one expert)
  int tokens = 16;          // per attention-TP group and step, all micro-batches together
  ferry_dtype_t out_dtype = FERRY_BF16;
  uint64_t seed = 1;

  int num_groups() const { return world_size / tp_size; }
  int experts_per_rank() const { return num_experts / world_size; }
  int group_of(int rank) const { return rank / tp_size; }
  int member_of(int rank) const { return rank % tp_size; }
};

// Empty when the shape is valid; otherwise a message naming the field and the expected value.
std::string check_shape(const LayerShape& shape);

enum class Matrix : uint32_t { router = 0, gate = 1, up = 2, down = 3 };

// One parameter. router: [hidden][num_experts] (expert ignored); gate and up: [hidden][intermediate]
// of `expert`; down: [intermediate][hidden] of `expert`. Multiples of 1/64 in [-1, 1], scaled by
// 2^-round(log2(sqrt(fan_in))) so that activations keep their magnitude.
float weight(const LayerShape& shape, Matrix matrix, int expert, int row, int col);

// W_router as [hidden][num_experts] fp32.
std::vector<float> router_weights(const LayerShape& shape);
// One expert's matrices, fp32: gate_up [hidden][2 * intermediate] (gate columns, then up columns)
// and down [intermediate][hidden].
void expert_weights(const LayerShape& shape, int expert, float* gate_up, float* down);

// What member `member` of attention-TP group `group` holds before the all-reduce: [tokens][hidden]
// bf16 bits, each value k/64 with |k| <= 32.
std::vector<uint16_t> attention_partial(const LayerShape& shape, int group, int member);

// What the TP all-reduce of a group must give: the sum of its members' partials, summed in fp64 and
// stored as bf16 (exact: model.h's grid).
std::vector<uint16_t> hidden_states(const LayerShape& shape, int group);

// The all-to-all config of one micro-batch's handle: bf16 dispatch, out_dtype combine, dp_size =
// tp_size, max_tokens_per_rank = `max_tokens`.
ferry_a2a_config_t a2a_config(const LayerShape& shape, int rank, int max_tokens);

// Micro-batch b of `num_micro_batches` covers tokens [begin, end) of a group's step; the first
// ones take the remainder.
struct TokenRange {
  int begin = 0;
  int end = 0;
  int size() const { return end - begin; }
};
TokenRange micro_batch_range(int tokens, int num_micro_batches, int b);

}  // namespace ferry::moe
