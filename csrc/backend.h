// The seam between the C API and the byte movers: one Backend per ferry_a2a_t.
// The host backend runs the protocol on CPU threads over host memory; the CUDA backend runs the same
// protocol with kernels for pack/unpack and a proxy thread driving the transfer engine.
// Backends trust what the C API hands them (csrc/argcheck.h): a config that passed check_config,
// the ranks' agreement and resolve_config, whose rank is the bootstrap's; calls whose flags are one
// half or both in the step's order and whose arguments passed check_dispatch_args or
// check_combine_args. What only the step can see (expert ids, the count behind bound_m, what peers
// send) is theirs to check.
#pragma once
#include <memory>

#include "csrc/plan.h"
#include "ferry/ferry.h"
#include "transfer_engine/bootstrap.h"

namespace ferry::ep {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual void dispatch(const ferry_dispatch_args_t& args, void* stream) = 0;
  virtual void combine(const ferry_combine_args_t& args, void* stream) = 0;
  virtual ferry_buffer_sizes_t buffer_sizes() const = 0;
  virtual ferry_a2a_stats_t stats() const = 0;
};

// Checks a config (check_config: a message naming the field on failure, Status::invalid_argument
// or Status::unsupported) and derives the wire layout.
Layout make_layout(const ferry_a2a_config_t& config);
ferry_buffer_sizes_t buffer_sizes_for(const ferry_a2a_config_t& config);

std::unique_ptr<Backend> make_host_backend(const ferry_a2a_config_t& config, te::Bootstrap& bootstrap);
// Defined in csrc/cuda/ (ferry_cuda); only called when built with it (FERRY_CUDA_BACKEND).
std::unique_ptr<Backend> make_cuda_backend(const ferry_a2a_config_t& config, te::Bootstrap& bootstrap);

}  // namespace ferry::ep
