// The host backend: the protocol on the calling thread (pack, unpack, partial sums, spread over
// helper threads where the host has cores to spare: host::WorkPool) and the transfer engine's
// worker (bytes), over page-aligned host memory. Configs and call arguments come
// checked by the C API (csrc/argcheck.h); what is checked here is what only the step can see.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "csrc/argcheck.h"
#include "csrc/backend.h"
#include "csrc/errors.h"
#include "csrc/host/pack.h"
#include "csrc/host/work_pool.h"
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
  if (!p)
    raise(Status::out_of_memory,
          "host backend: cannot allocate " + std::to_string(rounded) + " bytes for the " + what + " buffer");
  std::memset(p, 0, rounded);
  return HostBuffer(p);
}

te::EngineConfig engine_config(const ferry_a2a_config_t& c) {
  te::EngineConfig ec;
  if (c.provider && *c.provider) ec.provider = c.provider;
  ec.nets_per_rank = c.nets_per_rank;
  ec.timeout_ms = c.timeout_ms;
  return ec;
}

class HostBackend final : public Backend {
 public:
  HostBackend(const ferry_a2a_config_t& config, te::Bootstrap& bootstrap)
      : config_(config),
        layout_(make_layout(config)),
        timeout_ms_(config.timeout_ms),
        send_(allocate(layout_.send_buffer_bytes(), "dispatch send")),
        recv_(allocate(layout_.recv_buffer_bytes(), "dispatch receive")),
        combine_send_(allocate(layout_.combine_send_bytes(), "combine send")),
        combine_recv_(allocate(layout_.combine_recv_bytes(), "combine receive")),
        pool_(host::host_threads(bootstrap.local_size())) {
    engine_ = std::make_unique<te::TransferEngine>(engine_config(config), bootstrap);
    ProtocolBuffers buffers;
    buffers.send = send_.get();
    buffers.recv = recv_.get();
    buffers.combine_send = combine_send_.get();
    buffers.combine_recv = combine_recv_.get();
    protocol_ = std::make_unique<Protocol>(layout_, *engine_, buffers, timeout_ms_);
  }

  void dispatch(const ferry_dispatch_args_t& args, void* /*stream*/) override {
    if (args.flags & FERRY_SEND) dispatch_send(args);
    if (args.flags & FERRY_RECV) dispatch_recv(args);
  }

  void combine(const ferry_combine_args_t& args, void* /*stream*/) override {
    if (args.flags & FERRY_SEND) {
      protocol_->begin_combine();
      failing_step([&] {
        pool_.parallel_for(int64_t(routes_.num_routes.size()), host::min_part_items(layout_.combine_slot_bytes()),
                           [&](int64_t first, int64_t end) {
                             host::pack_combine_records(layout_, routes_, args.expert_y, combine_send_.get(),
                                                        first, end);
                           });
        if (layout_.weights_at_combine) protocol_->post_combine(protocol_->recv_plan().count, routes_.num_routes);
        else protocol_->post_combine();
      });
    }
    if (args.flags & FERRY_RECV) {
      const SendPlan& mine = member_plans_[layout_.dp_member(layout_.rank)];
      protocol_->wait_combine(mine.slot_routes);
      failing_step([&] {
        pool_.parallel_for(mine.num_tokens, host::min_part_items(layout_.out_row_bytes()), [&](int64_t first, int64_t end) {
          if (layout_.weights_at_combine)
            host::unpack_combine_rows_tokens(layout_, mine, combine_recv_.get(), args.weights, args.out_tokens,
                                             args.accumulate != 0, first, end);
          else
            host::unpack_combine_tokens(layout_, member_plans_, combine_recv_.get(), args.out_tokens,
                                        args.accumulate != 0, first, end);
        });
      });
    }
  }

  ferry_buffer_sizes_t buffer_sizes() const override { return buffer_sizes_for(config_); }

  ferry_a2a_stats_t stats() const override {
    const ProtocolStats& s = protocol_->stats();
    return {s.dispatch_bytes_sent, s.combine_bytes_sent, s.dispatch_records_sent, s.overflow_records_sent};
  }

 private:
  Site site(std::string_view operation) const { return {layout_.rank, int64_t(protocol_->step()), operation}; }

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

  // The inputs themselves (the token count behind bound_m, the expert ids) are checked while the
  // step runs: a bad value fails the step on every rank, since the peers are told at once.
  void dispatch_send(const ferry_dispatch_args_t& a) {
    protocol_->begin_dispatch();
    try {
      const int n = a.bound_m ? *a.bound_m : a.num_tokens;
      if (n < 0 || n > a.num_tokens)
        fail(Status::invalid_argument, site("dispatch SEND"),
             "*bound_m = " + std::to_string(n) + " outside [0, num_tokens=" + std::to_string(a.num_tokens) + "]");
      validate_routing(layout_, a.indices, n);
      member_plans_.clear();
      for (int j = 0; j < layout_.dp_size; ++j) member_plans_.push_back(make_send_plan(layout_, a.indices, n, j));
      const SendPlan& mine = member_plans_[layout_.dp_member(layout_.rank)];
      const host::Quantize quantize{enum_value(a.quantize) == FERRY_QUANTIZE_FP8_BLOCK, a.round_scale != 0};
      host::pack_count_headers(layout_, mine, send_.get());
      pool_.parallel_for(mine.num_tokens, host::min_part_items(layout_.record_bytes), [&](int64_t first, int64_t end) {
        host::pack_dispatch_tokens(layout_, mine, a.dp_x, a.dp_x_scale, a.indices, a.weights, send_.get(), quantize,
                                   first, end);
      });
      protocol_->post_dispatch(mine.dest_count, mine.dest_offset);
    } catch (...) {
      protocol_->post_dispatch_failure();
      throw;
    }
  }

  void dispatch_recv(const ferry_dispatch_args_t& a) {
    const RecvPlan& plan = protocol_->wait_dispatch();
    failing_step([&] {
      check_dp_group_agrees();
      host::unpack_dispatch(layout_, plan, recv_.get(), a.out_expert_num_tokens, a.out_expert_x, a.out_expert_x_scale,
                            routes_, enum_value(a.out_scale_layout), a.out_expert_src_token,
                            a.out_expert_num_tokens_per_rank);
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
        fail(Status::invalid_argument, site("dispatch RECV"),
             "rank " + std::to_string(first + j) + " of this rank's dp group (dp_size " +
                 std::to_string(layout_.dp_size) + ") routed different tokens; members of a group must pass the "
                 "same num_tokens and indices");
    }
  }

  ferry_a2a_config_t config_;
  Layout layout_;
  int timeout_ms_;
  HostBuffer send_, recv_, combine_send_, combine_recv_;
  host::WorkPool pool_;
  std::unique_ptr<te::TransferEngine> engine_;
  std::unique_ptr<Protocol> protocol_;  // after engine_: deregisters before the engine goes
  std::vector<SendPlan> member_plans_;
  host::ReceivedRoutes routes_;
};

}  // namespace

std::unique_ptr<Backend> make_host_backend(const ferry_a2a_config_t& config, te::Bootstrap& bootstrap) {
  return std::make_unique<HostBackend>(config, bootstrap);
}

}  // namespace ferry::ep
