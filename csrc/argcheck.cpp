#include "csrc/argcheck.h"

#include <algorithm>
#include <string>

#include "transfer_engine/engine.h"
#include "transfer_engine/imm.h"

namespace ferry::ep {
namespace {

static_assert(te::kMaxNics == FERRY_MAX_NETS_PER_RANK, "ferry.h states the NICs the engine can open");

const Site kConfig{-1, -1, "ferry_a2a_config"};

[[noreturn]] void bad_config(const std::string& what) { fail(Status::invalid_argument, kConfig, what); }
[[noreturn]] void unsupported_config(const std::string& what) { fail(Status::unsupported, kConfig, what); }

std::string str(int64_t v) { return std::to_string(v); }

// The buffers a valid layout registers, in 128 bits: a config must not wrap 64-bit sizes.
unsigned __int128 buffer_bytes(const ferry_a2a_config_t& c, int in_elem, int out_elem, int num_scales, int combine_rows) {
  using U = unsigned __int128;
  const U record = U(align_up(sizeof(RecordHeader) + uint64_t(c.hidden_dim) * in_elem + uint64_t(num_scales) * 4));
  const U partial = U(align_up(uint64_t(c.hidden_dim) * out_elem)) * U(combine_rows);
  const U header = U(align_up(4 * (uint64_t(c.world_size) + uint64_t(c.num_experts / c.world_size))));
  const U max_recv = U(c.world_size) * U(c.max_tokens_per_rank);
  const U max_send = U(c.max_tokens_per_rank) * U(std::min(c.experts_per_token, c.world_size));
  return U(c.world_size) * header * 2 + (max_send + max_recv) * (record + partial);
}

const char* scale_layout_name(int scale_layout) {
  switch (scale_layout) {
    case FERRY_SCALE_ROW_MAJOR: return "FERRY_SCALE_ROW_MAJOR";
    case FERRY_SCALE_COLUMN_MAJOR: return "FERRY_SCALE_COLUMN_MAJOR";
    case FERRY_SCALE_UE8M0_COLUMN_MAJOR: return "FERRY_SCALE_UE8M0_COLUMN_MAJOR";
    default: return "unknown";
  }
}

// The quantize arguments of a dispatch SEND against the all-to-all's wire format.
void check_quantize(const Layout& l, const ferry_dispatch_args_t& a, const Site& site) {
  const int quantize = enum_value(a.quantize);
  if (quantize != FERRY_QUANTIZE_NONE && quantize != FERRY_QUANTIZE_FP8_BLOCK)
    fail(Status::invalid_argument, site,
         "quantize " + str(quantize) + " is not a ferry_quantize_t (FERRY_QUANTIZE_NONE 0, FERRY_QUANTIZE_FP8_BLOCK 1)");
  if (a.round_scale != 0 && a.round_scale != 1)
    fail(Status::invalid_argument, site, "round_scale " + str(a.round_scale) + " must be 0 or 1");
  if (quantize == FERRY_QUANTIZE_NONE) {
    if (a.round_scale)
      fail(Status::invalid_argument, site,
           "round_scale 1 with FERRY_QUANTIZE_NONE: it rounds the scales Ferry computes when it quantizes; "
           "without quantize the scales are dp_x_scale's");
    return;
  }
  if (l.in_dtype != FERRY_FP8_E4M3)
    fail(Status::invalid_argument, site,
         std::string("quantize FERRY_QUANTIZE_FP8_BLOCK casts bf16 tokens to fp8_e4m3, but this all-to-all carries ") +
             dtype_name(l.in_dtype) + " (create it with in_dtype FERRY_FP8_E4M3 and a scale_block)");
  const int b = l.scale_block;
  if (b < FERRY_QUANTIZE_MIN_BLOCK || b > FERRY_QUANTIZE_MAX_BLOCK || (b & (b - 1)) != 0)
    fail(Status::invalid_argument, site,
         "quantize FERRY_QUANTIZE_FP8_BLOCK needs a scale_block that is a power of two in [" +
             str(FERRY_QUANTIZE_MIN_BLOCK) + ", " + str(FERRY_QUANTIZE_MAX_BLOCK) + "] (one scale per block); this "
             "all-to-all has scale_block " + str(b));
  if (a.dp_x_scale)
    fail(Status::invalid_argument, site,
         "dp_x_scale must be NULL with quantize FERRY_QUANTIZE_FP8_BLOCK: Ferry computes the scales from dp_x (bf16)");
}

}  // namespace

const char* dtype_name(int dtype) {
  switch (dtype) {
    case FERRY_BF16: return "bf16";
    case FERRY_F16: return "f16";
    case FERRY_F32: return "f32";
    case FERRY_FP8_E4M3: return "fp8_e4m3";
    default: return "unknown";
  }
}

const char* combine_weights_name(int combine_weights) {
  switch (combine_weights) {
    case FERRY_WEIGHTS_AT_DISPATCH: return "at dispatch";
    case FERRY_WEIGHTS_AT_COMBINE: return "at combine";
    default: return "unknown";
  }
}

const char* device_name(int device) {
  switch (device) {
    case FERRY_DEVICE_HOST: return "host";
    case FERRY_DEVICE_CUDA: return "cuda";
    default: return "unknown";
  }
}

void check_config(const ferry_a2a_config_t& c) {
  const int in_dtype = enum_value(c.in_dtype), out_dtype = enum_value(c.out_dtype), device = enum_value(c.device);
  const int max_ranks = std::min<int>(kMaxRanks, int(te::imm::kMaxRanks));
  if (c.world_size < 1 || c.world_size > max_ranks)
    bad_config("world_size " + str(c.world_size) + " outside [1, " + str(max_ranks) + "]");
  if (c.rank < 0 || c.rank >= c.world_size)
    bad_config("rank " + str(c.rank) + " outside [0, world_size=" + str(c.world_size) + ")");
  if (c.dp_size < 1 || c.world_size % c.dp_size != 0)
    bad_config("dp_size " + str(c.dp_size) + " must be >= 1 and divide world_size " + str(c.world_size));
  if (c.num_experts < 1 || c.num_experts % c.world_size != 0)
    bad_config("num_experts " + str(c.num_experts) + " must be a positive multiple of world_size " +
               str(c.world_size) + " (experts are placed contiguously, the same number per rank)");
  if (c.num_experts / c.world_size > kMaxExpertsPerRank)
    unsupported_config("num_experts " + str(c.num_experts) + " over world_size " + str(c.world_size) + " is " +
                       str(c.num_experts / c.world_size) + " experts per rank, above " + str(kMaxExpertsPerRank) +
                       ": a token record names the receiver's local expert in 16 bits");
  if (c.experts_per_token < 1 || c.experts_per_token > kMaxTopK)
    unsupported_config("experts_per_token " + str(c.experts_per_token) + " outside the supported top-k range [1, " +
                       str(kMaxTopK) + "]");
  if (c.experts_per_token > c.num_experts)
    bad_config("experts_per_token " + str(c.experts_per_token) + " exceeds num_experts " + str(c.num_experts));
  if (c.max_tokens_per_rank < 1) bad_config("max_tokens_per_rank " + str(c.max_tokens_per_rank) + " must be >= 1");
  if (int64_t(c.max_tokens_per_rank) * c.world_size > (int64_t(1) << 30))
    bad_config("world_size * max_tokens_per_rank exceeds 2^30 rows");
  if (in_dtype < FERRY_BF16 || in_dtype > FERRY_FP8_E4M3)
    unsupported_config("in_dtype " + str(in_dtype) + " is not a ferry_dtype_t");
  if (out_dtype < FERRY_BF16 || out_dtype > FERRY_F32)
    unsupported_config(std::string("out_dtype ") + dtype_name(out_dtype) + " (" + str(out_dtype) +
                       ") unsupported for combine (bf16, f16 or f32)");
  const int in_elem = elem_bytes_of(in_dtype), out_elem = elem_bytes_of(out_dtype);
  if (c.hidden_dim < 1 || (int64_t(c.hidden_dim) * in_elem) % int64_t(kAlign) != 0)
    unsupported_config("hidden_dim " + str(c.hidden_dim) + " of " + dtype_name(in_dtype) +
                       " is not a positive multiple of 16 bytes (rows move as 16-byte vectors)");
  if (c.scale_block < 0 || (c.scale_block > 0 && c.hidden_dim % c.scale_block != 0))
    unsupported_config("hidden_dim " + str(c.hidden_dim) + " is not a multiple of scale_block " + str(c.scale_block));
  if (c.expert_alignment < 1 || c.expert_alignment > kMaxExpertAlignment)
    bad_config("expert_alignment " + str(c.expert_alignment) + " outside [1, 2^30]");
  if (c.private_tokens < -1 || c.private_tokens > c.max_tokens_per_rank)
    bad_config("private_tokens " + str(c.private_tokens) + " outside [0, max_tokens_per_rank=" +
               str(c.max_tokens_per_rank) + "] (or -1: automatic)");
  if (c.timeout_ms < 0) bad_config("timeout_ms " + str(c.timeout_ms) + " must be >= 0 (0: default)");
  if (c.nets_per_rank < 1 || c.nets_per_rank > FERRY_MAX_NETS_PER_RANK)
    bad_config("nets_per_rank " + str(c.nets_per_rank) + " outside [1, " + str(FERRY_MAX_NETS_PER_RANK) + "]");
  if (device != FERRY_DEVICE_HOST && device != FERRY_DEVICE_CUDA)
    bad_config("device " + str(device) + " is neither host nor cuda");
  const int combine_weights = enum_value(c.combine_weights);
  if (combine_weights != FERRY_WEIGHTS_AT_DISPATCH && combine_weights != FERRY_WEIGHTS_AT_COMBINE)
    bad_config("combine_weights " + str(combine_weights) +
               " is not a ferry_combine_weights_t (FERRY_WEIGHTS_AT_DISPATCH 0, FERRY_WEIGHTS_AT_COMBINE 1)");
  if (combine_weights == FERRY_WEIGHTS_AT_COMBINE && c.dp_size != 1)
    unsupported_config("combine_weights FERRY_WEIGHTS_AT_COMBINE supports dp_size 1 (got " + str(c.dp_size) + ")");
  const int num_scales = c.scale_block > 0 ? c.hidden_dim / c.scale_block : 0;
  const int combine_rows =
      combine_weights == FERRY_WEIGHTS_AT_COMBINE ? std::min(c.experts_per_token, c.num_experts / c.world_size) : 1;
  const unsigned __int128 bytes = buffer_bytes(c, in_elem, out_elem, num_scales, combine_rows);
  if (bytes > kMaxBufferBytes)
    unsupported_config("hidden_dim " + str(c.hidden_dim) + ", max_tokens_per_rank " + str(c.max_tokens_per_rank) +
                       " and world_size " + str(c.world_size) + " need " +
                       (bytes >> 64 ? std::string("more than 2^64") : std::to_string(uint64_t(bytes))) +
                       " bytes of buffers, above the 2^50 the library allows");
  if (device == FERRY_DEVICE_CUDA) {
    if (c.cuda_device < -1) bad_config("cuda_device " + str(c.cuda_device) + " must be >= 0 (or -1: current device)");
    if (c.dp_size != 1) unsupported_config("the CUDA backend supports dp_size 1 (got " + str(c.dp_size) + ")");
    if ((int64_t(c.hidden_dim) * out_elem) % int64_t(kAlign) != 0)
      unsupported_config("the CUDA kernels move 16-byte vectors: hidden_dim " + str(c.hidden_dim) + " of out_dtype " +
                         dtype_name(out_dtype) + " is not a multiple of 16 bytes");
  }
}

ferry_a2a_config_t resolve_config(const ferry_a2a_config_t& config) {
  ferry_a2a_config_t c = config;
  if (c.timeout_ms == 0) c.timeout_ms = FERRY_DEFAULT_TIMEOUT_MS;
  return c;
}

void check_bootstrap(const ferry_a2a_config_t& c, int bootstrap_rank, int bootstrap_world_size) {
  if (c.rank != bootstrap_rank || c.world_size != bootstrap_world_size)
    fail(Status::invalid_argument, {bootstrap_rank, -1, "ferry_a2a_create"},
         "ferry_a2a_config says rank " + str(c.rank) + " of world_size " + str(c.world_size) +
             " but the bootstrap is rank " + str(bootstrap_rank) + " of " + str(bootstrap_world_size));
}

void StepOrder::check(bool dispatch, int flags, const Site& site) const {
  if (flags != FERRY_SEND && flags != FERRY_RECV && flags != FERRY_SEND_RECV)
    fail(Status::invalid_argument, site,
         "flags " + str(flags) + " must be FERRY_SEND (1), FERRY_RECV (2) or FERRY_SEND_RECV (3)");
  const Half first = dispatch ? (flags & FERRY_SEND ? kDispatchSend : kDispatchRecv)
                              : (flags & FERRY_SEND ? kCombineSend : kCombineRecv);
  if (first != next_) {
    static const char* const names[] = {"dispatch SEND", "dispatch RECV", "combine SEND", "combine RECV"};
    fail(Status::invalid_argument, site,
         std::string("out of order: dispatch SEND, dispatch RECV, combine SEND and combine RECV must alternate; "
                     "this call is ") + names[first] + ", the next half is " + names[next_]);
  }
}

void StepOrder::advance(bool dispatch, int flags) {
  const int halves = flags == FERRY_SEND_RECV ? 2 : 1;
  next_ = Half((next_ + halves) % 4);
  if (!dispatch && (flags & FERRY_RECV)) ++step_;
}

void check_dispatch_args(const Layout& l, const ferry_dispatch_args_t& a, const Site& site) {
  if (a.flags & FERRY_SEND) {
    if (a.num_tokens < 0 || a.num_tokens > l.max_tokens)
      fail(Status::invalid_argument, site,
           "num_tokens " + str(a.num_tokens) + " outside [0, max_tokens_per_rank=" + str(l.max_tokens) + "]");
    check_quantize(l, a, site);
    const bool scales_needed = l.num_scales > 0 && enum_value(a.quantize) == FERRY_QUANTIZE_NONE;
    const bool weights_needed = !l.weights_at_combine;
    if (a.num_tokens > 0 &&
        (!a.dp_x || !a.indices || (weights_needed && !a.weights) || (scales_needed && !a.dp_x_scale)))
      fail(Status::invalid_argument, site,
           std::string("dp_x, indices, weights (unless they come at combine) and dp_x_scale (with scale_block > 0, "
                       "unless Ferry quantizes) must not be NULL with ") +
               str(a.num_tokens) + " tokens (" +
               (!a.dp_x ? "dp_x" : !a.indices ? "indices" : weights_needed && !a.weights ? "weights" : "dp_x_scale") +
               " is)");
  }
  if (a.flags & FERRY_RECV) {
    const int scale_layout = enum_value(a.out_scale_layout);
    if (scale_layout < FERRY_SCALE_ROW_MAJOR || scale_layout > FERRY_SCALE_UE8M0_COLUMN_MAJOR)
      fail(Status::invalid_argument, site,
           "out_scale_layout " + str(scale_layout) +
               " is not a ferry_scale_layout_t (FERRY_SCALE_ROW_MAJOR 0, FERRY_SCALE_COLUMN_MAJOR 1, "
               "FERRY_SCALE_UE8M0_COLUMN_MAJOR 2)");
    if (scale_layout != FERRY_SCALE_ROW_MAJOR && l.num_scales == 0)
      fail(Status::invalid_argument, site,
           std::string("out_scale_layout ") + scale_layout_name(scale_layout) +
               " lays out scales, and this all-to-all carries none (scale_block 0)");
    if (!a.out_expert_num_tokens || !a.out_expert_x || (l.num_scales > 0 && !a.out_expert_x_scale))
      fail(Status::invalid_argument, site,
           std::string("out_expert_num_tokens, out_expert_x (and out_expert_x_scale with scale_block > 0) must not "
                       "be NULL (") +
               (!a.out_expert_num_tokens ? "out_expert_num_tokens" : !a.out_expert_x ? "out_expert_x" : "out_expert_x_scale") +
               " is)");
  }
}

void check_combine_args(const Layout& l, const ferry_combine_args_t& a, int dispatch_num_tokens, const Site& site) {
  if ((a.flags & FERRY_SEND) && !a.expert_y) fail(Status::invalid_argument, site, "expert_y must not be NULL");
  if (a.flags & FERRY_RECV) {
    if (a.num_tokens != dispatch_num_tokens)
      fail(Status::invalid_argument, site,
           "num_tokens " + str(a.num_tokens) + " is not the " + str(dispatch_num_tokens) +
               " of this step's dispatch: combine returns exactly the rows its dispatch sent (max_tokens_per_rank " +
               str(l.max_tokens) + ")");
    if (!a.out_tokens && a.num_tokens > 0)
      fail(Status::invalid_argument, site, "out_tokens must not be NULL with " + str(a.num_tokens) + " tokens");
    if (l.weights_at_combine && !a.weights && a.num_tokens > 0)
      fail(Status::invalid_argument, site,
           "weights must not be NULL with " + str(a.num_tokens) +
               " tokens: this all-to-all takes them at combine (FERRY_WEIGHTS_AT_COMBINE)");
  }
}

}  // namespace ferry::ep
