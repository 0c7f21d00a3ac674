// C++ face of ferry.h: RAII handles, std::span arguments, and exceptions carrying the status.
#pragma once
#include <cstddef>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "ferry/ferry.h"

namespace ferry {

// Thrown for every non-OK status; what() is ferry_last_error() of the failed call.
class Exception : public std::runtime_error {
 public:
  Exception(ferry_status_t status, const std::string& what) : std::runtime_error(what), status_(status) {}
  ferry_status_t status() const { return status_; }

 private:
  ferry_status_t status_;
};

inline void check(ferry_status_t status) {
  if (status != FERRY_OK) throw Exception(status, ferry_last_error());
}

class Bootstrap {
 public:
  static Bootstrap from_env(int timeout_ms = FERRY_DEFAULT_BOOTSTRAP_TIMEOUT_MS) {
    ferry_bootstrap_t b = nullptr;
    check(ferry_bootstrap_from_env(timeout_ms, &b));
    return Bootstrap(b);
  }
  static Bootstrap tcp(const std::string& master_addr, int master_port, int rank, int world_size,
                       int timeout_ms = FERRY_DEFAULT_BOOTSTRAP_TIMEOUT_MS) {
    ferry_bootstrap_t b = nullptr;
    check(ferry_bootstrap_tcp(master_addr.c_str(), master_port, rank, world_size, timeout_ms, &b));
    return Bootstrap(b);
  }
  static Bootstrap mpi() {
    ferry_bootstrap_t b = nullptr;
    check(ferry_bootstrap_mpi(&b));
    return Bootstrap(b);
  }
  // The caller's process group; `context` must outlive the Bootstrap.
  static Bootstrap callback(int rank, int world_size, ferry_allgather_fn allgather, void* context) {
    ferry_bootstrap_t b = nullptr;
    check(ferry_bootstrap_callback(rank, world_size, allgather, context, &b));
    return Bootstrap(b);
  }

  Bootstrap(Bootstrap&& o) noexcept : handle_(std::exchange(o.handle_, nullptr)) {}
  Bootstrap& operator=(Bootstrap&& o) noexcept {
    std::swap(handle_, o.handle_);
    return *this;
  }
  ~Bootstrap() {
    if (handle_) ferry_bootstrap_destroy(handle_);
  }
  ferry_bootstrap_t handle() const { return handle_; }
  int rank() const {
    int r = -1;
    check(ferry_bootstrap_rank(handle_, &r));
    return r;
  }
  int world_size() const {
    int n = 0;
    check(ferry_bootstrap_world_size(handle_, &n));
    return n;
  }
  // Collective: every rank's `mine` (all the same size), rank-major. timeout_ms <= 0: the default.
  std::vector<std::byte> allgather(std::span<const std::byte> mine, int timeout_ms = 0) const {
    std::vector<std::byte> all(mine.size() * size_t(world_size()));
    check(ferry_bootstrap_allgather(handle_, mine.data(), mine.size(), all.data(), timeout_ms));
    return all;
  }

 private:
  explicit Bootstrap(ferry_bootstrap_t h) : handle_(h) {}
  ferry_bootstrap_t handle_ = nullptr;
};

// The per-call options of a dispatch (ferry_dispatch_args_t's quantize, round_scale, out_scale_layout).
struct DispatchOptions {
  ferry_quantize_t quantize = FERRY_QUANTIZE_NONE;  // FERRY_QUANTIZE_FP8_BLOCK: dp_x is bf16
  bool round_scale = false;
  ferry_scale_layout_t out_scale_layout = FERRY_SCALE_ROW_MAJOR;
  int32_t* out_expert_src_token = nullptr;            // [expert_rows()] or null
  int32_t* out_expert_num_tokens_per_rank = nullptr;  // [num_local_experts][world_size] or null
};

// Byte-typed views of the dtype-dependent buffers; sizes are checked against the config.
class AllToAll {
 public:
  AllToAll(const ferry_a2a_config_t& config, const Bootstrap& bootstrap) : config_(config) {
    check(ferry_a2a_create(&config_, bootstrap.handle(), &handle_));
    check(ferry_a2a_buffer_bytes(handle_, &sizes_));
  }
  AllToAll(AllToAll&& o) noexcept
      : config_(o.config_), sizes_(o.sizes_), handle_(std::exchange(o.handle_, nullptr)) {}
  AllToAll& operator=(AllToAll&&) = delete;
  AllToAll(const AllToAll&) = delete;
  ~AllToAll() {
    if (handle_) ferry_a2a_destroy(handle_);
  }

  static ferry_buffer_sizes_t buffer_sizes(const ferry_a2a_config_t& config) {
    ferry_buffer_sizes_t s;
    check(ferry_a2a_buffer_sizes(&config, &s));
    return s;
  }
  const ferry_buffer_sizes_t& sizes() const { return sizes_; }
  const ferry_a2a_config_t& config() const { return config_; }
  ferry_a2a_t handle() const { return handle_; }

  // Elements of the batched expert-major outputs (rows = num_local_experts * max_rows_per_expert).
  size_t expert_rows() const { return size_t(sizes_.num_local_experts) * sizes_.max_rows_per_expert; }
  size_t num_scales() const { return config_.scale_block > 0 ? size_t(config_.hidden_dim / config_.scale_block) : 0; }

  // out_expert_x_scale: f32 elements, or int32 words viewed as f32 with FERRY_SCALE_UE8M0_COLUMN_MAJOR
  // (expert_rows() * ceil(num_scales() / 4) of them).
  void dispatch(std::span<int32_t> out_expert_num_tokens, std::span<std::byte> out_expert_x,
                std::span<float> out_expert_x_scale, std::span<const std::byte> dp_x,
                std::span<const float> dp_x_scale, std::span<const int32_t> indices,
                std::span<const float> weights, int num_tokens, int flags = FERRY_SEND_RECV,
                const int32_t* bound_m = nullptr, void* stream = nullptr, const DispatchOptions& options = {}) {
    const size_t k = size_t(config_.experts_per_token), n = size_t(num_tokens);
    const bool quantize = options.quantize == FERRY_QUANTIZE_FP8_BLOCK;
    if (flags & FERRY_SEND) {
      need(dp_x.size(), n * row_bytes(quantize ? FERRY_BF16 : config_.in_dtype), "dp_x");
      need(dp_x_scale.size(), quantize ? 0 : n * num_scales(), "dp_x_scale");
      need(indices.size(), n * k, "indices");
      need(weights.size(), n * k, "weights");
    }
    if (flags & FERRY_RECV) {
      const size_t scale_columns = options.out_scale_layout == FERRY_SCALE_UE8M0_COLUMN_MAJOR ? (num_scales() + 3) / 4
                                                                                            : num_scales();
      need(out_expert_num_tokens.size(), size_t(sizes_.num_local_experts), "out_expert_num_tokens");
      need(out_expert_x.size(), expert_rows() * row_bytes(config_.in_dtype), "out_expert_x");
      need(out_expert_x_scale.size(), expert_rows() * scale_columns, "out_expert_x_scale");
    }
    ferry_dispatch_args_t a{};
    a.out_expert_num_tokens = out_expert_num_tokens.data();
    a.out_expert_x = out_expert_x.data();
    a.out_expert_x_scale = out_expert_x_scale.empty() ? nullptr : out_expert_x_scale.data();
    a.dp_x = dp_x.data();
    a.dp_x_scale = dp_x_scale.empty() ? nullptr : dp_x_scale.data();
    a.indices = indices.data();
    a.weights = weights.data();
    a.bound_m = bound_m;
    a.num_tokens = num_tokens;
    a.flags = flags;
    a.quantize = options.quantize;
    a.round_scale = options.round_scale ? 1 : 0;
    a.out_scale_layout = options.out_scale_layout;
    a.out_expert_src_token = options.out_expert_src_token;
    a.out_expert_num_tokens_per_rank = options.out_expert_num_tokens_per_rank;
    check(ferry_a2a_dispatch(handle_, &a, stream));
  }

  void combine(std::span<std::byte> out_tokens, std::span<const int32_t> indices, std::span<const float> weights,
               std::span<const std::byte> expert_y, int num_tokens, bool accumulate = false,
               int flags = FERRY_SEND_RECV, const int32_t* bound_m = nullptr, void* stream = nullptr) {
    if (flags & FERRY_SEND) need(expert_y.size(), expert_rows() * row_bytes(config_.out_dtype), "expert_y");
    if (flags & FERRY_RECV) need(out_tokens.size(), size_t(num_tokens) * row_bytes(config_.out_dtype), "out_tokens");
    ferry_combine_args_t a{};
    a.out_tokens = out_tokens.data();
    a.indices = indices.data();
    a.weights = weights.data();
    a.expert_y = expert_y.data();
    a.bound_m = bound_m;
    a.num_tokens = num_tokens;
    a.accumulate = accumulate ? 1 : 0;
    a.flags = flags;
    check(ferry_a2a_combine(handle_, &a, stream));
  }

  ferry_a2a_stats_t stats() const {
    ferry_a2a_stats_t s;
    check(ferry_a2a_stats(handle_, &s));
    return s;
  }

 private:
  size_t row_bytes(ferry_dtype_t t) const {
    const size_t elem = t == FERRY_F32 ? 4 : t == FERRY_FP8_E4M3 ? 1 : 2;
    return size_t(config_.hidden_dim) * elem;
  }
  static void need(size_t have, size_t want, const char* what) {
    if (have < want)
      throw Exception(FERRY_ERR_INVALID_ARGUMENT, std::string(what) + " holds " + std::to_string(have) +
                                                      " elements, the call needs " + std::to_string(want));
  }

  ferry_a2a_config_t config_;
  ferry_buffer_sizes_t sizes_{};
  ferry_a2a_t handle_ = nullptr;
};

}  // namespace ferry
