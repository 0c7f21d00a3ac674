// Brute-force reference of the all-to-all: what every rank's dispatch must output and what its
// combine must return, computed from ALL ranks' inputs with the plainest loops, no wire format.
// Tests, ferry-bench --verify and ferry-check compare the real thing to it.
//
// Inputs come from a seeded generator that depends only on (config shape, spec, dp group), so any
// rank can regenerate every rank's inputs and check itself without exchanging anything.
#pragma once
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "csrc/plan.h"
#include "ferry/ferry.h"

namespace ferry::ep::reference {

enum class Routing {
  uniform,     // top-k distinct experts, uniformly at random
  one_expert,  // every token routes to the same (seeded) expert first; the rest uniform
  zipf,        // experts drawn with probability ~ 1 / (1 + rank)^zipf_s (a seeded permutation)
};

// Which ranks quantize on dispatch with round_scale (InputSpec::round_scale).
enum class RoundScale { none, all, odd_groups };

struct InputSpec {
  uint64_t seed = 1;
  Routing routing = Routing::uniform;
  double zipf_s = 1.2;
  double drop_fraction = 0.0;  // each route becomes -1 with this probability; when > 0, every
                               // 7th token also has no route at all
  int zero_tokens_every = 0;   // > 0: dp groups g with g % n == n - 1 have no tokens
  bool vary_tokens = false;    // tokens per group uniform in [0, max_tokens_per_rank]
  // Quantize on dispatch (in_dtype fp8 with scales): x is bf16, blocks of widely varying magnitude
  // (2^-20 .. 2^20), every 5th block of a token all zeros, some tokens with infinities.
  bool quantize = false;
  RoundScale round_scale = RoundScale::none;
};

struct RankInput {
  int num_tokens = 0;
  bool quantize = false;         // x is bf16 and this rank's dispatch quantizes it
  bool round_scale = false;      // with quantize
  std::vector<uint8_t> x;        // [num_tokens][hidden] in_dtype, or bf16 with quantize
  std::vector<float> x_scale;    // [num_tokens][hidden / scale_block], empty without scales or with quantize
  std::vector<int32_t> indices;  // [num_tokens][top_k]
  std::vector<float> weights;    // [num_tokens][top_k]
};

// Inputs of `rank` (identical for every rank of its dp group).
RankInput generate_input(const ferry_a2a_config_t& config, const InputSpec& spec, int rank);
std::vector<RankInput> generate_all(const ferry_a2a_config_t& config, const InputSpec& spec);

// Quantize on dispatch, written from ferry.h's description of the numerics (not from the code
// that packs): the fp8 bytes of one token's bf16 row (hidden elements) and its scales.
struct QuantizedToken {
  std::vector<uint8_t> q;      // [hidden] fp8 e4m3
  std::vector<float> scale;    // [hidden / scale_block]
};
QuantizedToken quantize_token(const uint16_t* x, int hidden, int scale_block, bool round_scale);
// The fp8 e4m3 byte nearest to v (ties to even, saturating at +-448; NaN: 0x7f), by search.
uint8_t nearest_fp8(float v);

struct DispatchResult {
  std::vector<int32_t> expert_num_tokens;  // [num_local_experts]
  std::vector<int32_t> expert_padded_rows; // counts aligned up to expert_alignment
  // Batched layout: local expert e at row e * max_rows_per_expert; rows from the count to the
  // padded count are zero; rows past the padded count are zero here but unspecified in real output.
  std::vector<uint8_t> expert_x;     // [num_local_experts * max_rows_per_expert][hidden] in_dtype
  std::vector<float> expert_x_scale; // [num_local_experts * max_rows_per_expert][num_scales]
  std::vector<int32_t> expert_src_token;            // [rows] token index on its source rank, -1 past the count
  std::vector<int32_t> expert_num_tokens_per_rank;  // [num_local_experts][world_size]
};
DispatchResult dispatch(const ferry_a2a_config_t& config, std::span<const RankInput> inputs, int rank);

// expert_y row of (rank, local expert, row) in out_dtype.
using ExpertRowFn = std::function<const void*(int rank, int local_expert, int row)>;
// out[t][h] = sum_k weights[t][k] * expert_y[row of (t, k)] in fp32, for `rank`'s tokens.
std::vector<float> combine(const ferry_a2a_config_t& config, std::span<const RankInput> inputs, int rank,
                           const ExpertRowFn& expert_y);

// The expert model tests and tools use: y = dequant(x) * expert_gain(e), stored in out_dtype.
// Row contents alone decide y, so combine's reference needs only the rank's own input.
float expert_gain(int expert);
void apply_expert(const Layout& layout, int expert, const void* x_row, const float* scale_row, void* y_row);
// expert_y for a whole dispatch output of `layout.rank` (rows below the padded count; padding
// rows are zero in and out).
void apply_experts(const Layout& layout, const int32_t* expert_num_tokens, const void* expert_x,
                   const float* expert_x_scale, void* expert_y);
// combine's reference under the standard expert model.
std::vector<float> combine_standard(const ferry_a2a_config_t& config, const RankInput& input);

// Empty when equal; otherwise a description of the first differences (expert, row, byte).
// expert_x_scale is in `scale_layout` (a ferry_scale_layout_t); every byte of every row up to the
// padded count is compared, the zero bytes that fill a UE8M0 word included.
std::string compare_dispatch(const ferry_a2a_config_t& config, const DispatchResult& want,
                             const int32_t* expert_num_tokens, const void* expert_x,
                             const float* expert_x_scale, int scale_layout = 0);
// Empty when a dispatch's optional source outputs (ferry_dispatch_args_t's out_expert_src_token and
// out_expert_num_tokens_per_rank) hold what `want` says, for every row below each count.
std::string compare_sources(const ferry_a2a_config_t& config, const DispatchResult& want, const int32_t* src_token,
                            const int32_t* num_tokens_per_rank);
// A dispatch output's scales in `scale_layout` as the row-major [rows][num_scales] fp32 the
// expert model reads (UE8M0 bytes b as 2^(b - 127)).
std::vector<float> scales_as_rows(const ferry_a2a_config_t& config, int scale_layout, const void* expert_x_scale);
// Tolerance of one output element relative to sum_k |w_k * y_k| (partials are rounded once to
// out_dtype on every destination, and the sum once more).
double combine_tolerance(const ferry_a2a_config_t& config);
// Empty when every element is within tolerance; `magnitude` (same shape as want, may be empty)
// is sum_k |w_k y_k| per element, from combine_magnitude.
std::string compare_combine(const ferry_a2a_config_t& config, std::span<const float> want,
                            std::span<const float> magnitude, const void* out_tokens, int num_tokens);
std::vector<float> combine_magnitude_standard(const ferry_a2a_config_t& config, const RankInput& input);

}  // namespace ferry::ep::reference
