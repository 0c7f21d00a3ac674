#include "tests/common/a2a_case.h"

#include <chrono>
#include <thread>

namespace ferry::testing {

ferry_a2a_config_t config_of(const A2aCase& c, int rank, ferry_device_t device) {
  ferry_a2a_config_t cfg;
  ferry_a2a_config_init(&cfg);
  cfg.rank = rank;
  cfg.world_size = c.world_size;
  cfg.num_experts = c.num_experts;
  cfg.experts_per_token = c.top_k;
  cfg.max_tokens_per_rank = c.max_tokens;
  cfg.hidden_dim = c.hidden;
  cfg.in_dtype = c.in_dtype;
  cfg.out_dtype = c.out_dtype;
  cfg.scale_block = c.scale_block;
  cfg.expert_alignment = c.expert_alignment;
  cfg.dp_size = c.dp_size;
  cfg.private_tokens = c.private_tokens;
  cfg.combine_weights = c.combine_weights;
  cfg.provider = c.provider.c_str();
  cfg.nets_per_rank = c.nets_per_rank;
  cfg.timeout_ms = c.timeout_ms;
  cfg.device = device;
  if (device == FERRY_DEVICE_CUDA) cfg.cuda_device = 0;
  return cfg;
}

LaunchOptions launch_options(const A2aCase& c) {
  LaunchOptions opts;
  opts.world_size = c.world_size;
  opts.timeout_ms = c.launch_timeout_ms;
  if (c.host_threads > 0) opts.env["FERRY_HOST_THREADS"] = std::to_string(c.host_threads);
  return opts;
}

int node_of(const A2aCase& c, int rank) { return rank * c.nodes / c.world_size; }

ep::reference::InputSpec step_spec(const A2aCase& c, int step) {
  ep::reference::InputSpec spec = c.spec;
  spec.seed = c.spec.seed * 1000 + uint64_t(step);
  return spec;
}

HalfStepCaller::HalfStepCaller(const A2aCase& c, int rank)
    : split_(c.split), max_skew_ms_(c.max_skew_ms), random_(1234 + rank) {}

void HalfStepCaller::call(const std::function<void(int flags)>& operation) {
  pause();
  if (split_) {
    operation(FERRY_SEND);
    pause();
    operation(FERRY_RECV);
  } else {
    operation(FERRY_SEND_RECV);
  }
}

void HalfStepCaller::pause() {
  if (max_skew_ms_ > 0) std::this_thread::sleep_for(std::chrono::milliseconds(random_() % (max_skew_ms_ + 1)));
}

}  // namespace ferry::testing
