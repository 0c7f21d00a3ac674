// The host backend: the protocol on the calling thread (pack, unpack, partial sums) and the
// transfer engine's worker (bytes), over page-aligned host memory.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "csrc/backend.h"
#include "csrc/host/pack.h"
#include "csrc/protocol.h"
#include "transfer_engine/engine.h"

namespace ferry::ep {
namespace {

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using HostBuffer = std::unique_ptr<void, FreeDeleter>;

HostBuffer allocate(uint64_t bytes, const char* what) {
  constexpr uint64_t kPage = 4096;
  const uint64_t rounded = align_up(bytes ? bytes : 1, kPage);
  void* p = std::aligned_alloc(kPage, rounded);
  if (!p) raise(Status::out_of_memory, std::string("host backend: cannot allocate ") + std::to_string(rounded) +
                                           " bytes for the " + what + " buffer");
  std::memset(p, 0, rounded);
  return HostBuffer(p);
}

te::EngineConfig engine_config(const ferry_a2a_config_t& c, int timeout_ms) {
  te::EngineConfig ec;
  if (c.provider && *c.provider) ec.provider = c.provider;
  ec.nets_per_rank = c.nets_per_rank;
  ec.timeout_ms = timeout_ms;
  return ec;
}

class HostBackend final : public Backend {
 public:
  HostBackend(const ferry_a2a_config_t& config, te::Bootstrap& bootstrap)
      : config_(config),
        layout_(make_layout(config)),
        timeout_ms_(config.timeout_ms > 0 ? config.timeout_ms : 30000),
        send_(allocate(layout_.send_buffer_bytes(), "dispatch send")),
        recv_(allocate(layout_.recv_buffer_bytes(), "dispatch receive")),
        combine_send_(allocate(layout_.combine_send_bytes(), "combine send")),
        combine_recv_(allocate(layout_.combine_recv_bytes(), "combine receive")) {
    if (bootstrap.rank() != config.rank || bootstrap.world_size() != config.world_size)
      raise(Status::invalid_argument, "ferry_a2a_config says rank " + std::to_string(config.rank) + " of " +
                                          std::to_string(config.world_size) + " but the bootstrap is rank " +
                                          std::to_string(bootstrap.rank()) + " of " +
                                          std::to_string(bootstrap.world_size()));
    engine_ = std::make_unique<te::TransferEngine>(engine_config(config, timeout_ms_), bootstrap);
    ProtocolBuffers buffers;
    buffers.send = send_.get();
    buffers.recv = recv_.get();
    buffers.combine_send = combine_send_.get();
    buffers.combine_recv = combine_recv_.get();
    protocol_ = std::make_unique<Protocol>(layout_, *engine_, buffers, timeout_ms_);
  }

  void dispatch(const ferry_dispatch_args_t& args, void* /*stream*/) override {
    if (!(args.flags & (FERRY_SEND | FERRY_RECV)))
      raise(Status::invalid_argument, rank_text() + "dispatch flags " + std::to_string(args.flags) +
                                          " name neither FERRY_SEND nor FERRY_RECV");
    if (args.flags & FERRY_SEND) dispatch_send(args);
    if (args.flags & FERRY_RECV) dispatch_recv(args);
  }

  void combine(const ferry_combine_args_t& args, void* /*stream*/) override {
    if (!(args.flags & (FERRY_SEND | FERRY_RECV)))
      raise(Status::invalid_argument, rank_text() + "combine flags " + std::to_string(args.flags) +
                                          " name neither FERRY_SEND nor FERRY_RECV");
    if (args.flags & FERRY_SEND) {
      protocol_->begin_combine();
      failing_step([&] {
        if (!args.expert_y && !routes_.num_routes.empty()) fail_step("combine SEND: expert_y is null");
        host::pack_combine(layout_, routes_, args.expert_y, combine_send_.get());
        protocol_->post_combine();
      });
    }
    if (args.flags & FERRY_RECV) {
      // Argument errors before the wait leave the step intact: RECV may be called again.
      if (!args.out_tokens && num_tokens_ > 0) fail_step("combine RECV: out_tokens is null");
      if (args.num_tokens < num_tokens_)
        fail_step("combine RECV: num_tokens " + std::to_string(args.num_tokens) + " is smaller than the " +
                  std::to_string(num_tokens_) + " tokens of the matching dispatch (out_tokens would overflow)");
      protocol_->wait_combine();
      failing_step([&] {
        host::unpack_combine(layout_, member_plans_, combine_recv_.get(), args.out_tokens, args.accumulate != 0);
      });
    }
  }

  ferry_buffer_sizes_t buffer_sizes() const override { return buffer_sizes_for(config_); }

  ferry_a2a_stats_t stats() const override {
    const ProtocolStats& s = protocol_->stats();
    return {s.dispatch_bytes_sent, s.combine_bytes_sent, s.dispatch_records_sent, s.overflow_records_sent};
  }

 private:
  std::string rank_text() const { return "rank " + std::to_string(layout_.rank) + ": "; }

  // Runs one half-step's local work; a failure there leaves the exchange mid-step, so the protocol
  // refuses further steps instead of running on with stale state.
  template <class Fn>
  void failing_step(Fn&& fn) {
    try {
      fn();
    } catch (const std::exception& e) {
      protocol_->mark_failed(e.what());
      throw;
    }
  }

  [[noreturn]] void fail_step(const std::string& what) {
    raise(Status::invalid_argument, rank_text() + what);
  }

  void dispatch_send(const ferry_dispatch_args_t& a) {
    protocol_->begin_dispatch();
    try {
      const int n = a.bound_m ? *a.bound_m : a.num_tokens;
      if (a.num_tokens < 0 || a.num_tokens > layout_.max_tokens)
        fail_step("dispatch num_tokens " + std::to_string(a.num_tokens) + " outside [0, max_tokens_per_rank=" +
                  std::to_string(layout_.max_tokens) + "]");
      if (n < 0 || n > a.num_tokens)
        fail_step("dispatch bound_m " + std::to_string(n) + " outside [0, num_tokens=" + std::to_string(a.num_tokens) + "]");
      if (n > 0 && (!a.dp_x || !a.indices || !a.weights || (layout_.num_scales > 0 && !a.dp_x_scale)))
        fail_step("dispatch SEND: dp_x, indices, weights (and dp_x_scale with scale_block > 0) must not be null");
      validate_routing(layout_, a.indices, n);
      num_tokens_ = n;
      member_plans_.clear();
      for (int j = 0; j < layout_.dp_size; ++j) member_plans_.push_back(make_send_plan(layout_, a.indices, n, j));
      const SendPlan& mine = member_plans_[layout_.dp_member(layout_.rank)];
      host::pack_dispatch(layout_, mine, a.dp_x, a.dp_x_scale, a.indices, a.weights, send_.get());
      protocol_->post_dispatch(mine.dest_count, mine.dest_offset);
    } catch (...) {
      protocol_->post_dispatch_failure();
      throw;
    }
  }

  void dispatch_recv(const ferry_dispatch_args_t& a) {
    const RecvPlan& plan = protocol_->wait_dispatch();
    failing_step([&] {
      if (!a.out_expert_num_tokens || !a.out_expert_x || (layout_.num_scales > 0 && !a.out_expert_x_scale))
        fail_step("dispatch RECV: out_expert_num_tokens, out_expert_x (and out_expert_x_scale with scale_block > 0) "
                  "must not be null");
      check_dp_group_agrees();
      host::unpack_dispatch(layout_, plan, recv_.get(), a.out_expert_num_tokens, a.out_expert_x, a.out_expert_x_scale,
                            routes_);
    });
  }

  // Combine places the partials of the whole dp group by plans this rank derives from its own
  // inputs; members that were given different tokens would get each other's rows silently. The
  // count matrix catches differing token counts and routings that change a member's per-rank
  // counts (a cheap check, not a proof that the inputs are identical).
  void check_dp_group_agrees() const {
    if (layout_.dp_size == 1) return;
    const int R = layout_.world_size;
    const int first = layout_.rank - layout_.dp_member(layout_.rank);
    const std::vector<int32_t>& matrix = protocol_->count_matrix();
    for (int j = 0; j < layout_.dp_size; ++j) {
      const SendPlan& plan = member_plans_[j];
      if (!std::equal(plan.dest_count.begin(), plan.dest_count.end(), matrix.begin() + int64_t(first + j) * R))
        raise(Status::invalid_argument,
              rank_text() + "dispatch: rank " + std::to_string(first + j) + " of this rank's dp group (dp_size " +
                  std::to_string(layout_.dp_size) + ") routed different tokens; members of a group must pass the "
                  "same num_tokens and indices");
    }
  }

  ferry_a2a_config_t config_;
  Layout layout_;
  int timeout_ms_;
  HostBuffer send_, recv_, combine_send_, combine_recv_;
  std::unique_ptr<te::TransferEngine> engine_;
  std::unique_ptr<Protocol> protocol_;  // after engine_: deregisters before the engine goes
  int num_tokens_ = 0;
  std::vector<SendPlan> member_plans_;
  host::ReceivedRoutes routes_;
};

}  // namespace

std::unique_ptr<Backend> make_host_backend(const ferry_a2a_config_t& config, te::Bootstrap& bootstrap) {
  return std::make_unique<HostBackend>(config, bootstrap);
}

}  // namespace ferry::ep
