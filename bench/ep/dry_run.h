// --dry-run: what one rank would allocate and send at a given EP size, computed without launching
// anything (sizes from ferry_a2a_buffer_sizes, traffic from the expected routing of uniform top-k).
#pragma once
#include <cstdint>
#include <string>

#include "bench/ep/options.h"
#include "ferry/ferry.h"

namespace ferry::bench {

struct TrafficEstimate {
  double dests_per_token = 0;         // expected distinct destination ranks of one token (self included)
  double remote_dests_per_token = 0;  // same, other ranks only
  double ferry_dispatch_records = 0;  // per rank per step, to other ranks
  double ferry_dispatch_bytes = 0;    // records + count headers
  double ferry_combine_bytes = 0;     // one partial per record back
  double per_expert_dispatch_bytes = 0;  // one message per (token, remote expert), as pplx-garden
                                         // and DeepEP low-latency send
  double per_expert_combine_bytes = 0;
};

// Expected traffic for uniform routing: top-k distinct experts out of E, E/R per rank. The
// probability that a token has none of its k experts on a given rank is C(E - E/R, k) / C(E, k).
TrafficEstimate estimate_uniform_traffic(const Options& o, const ferry_buffer_sizes_t& sizes,
                                         int world_size);

// Prints the dry-run report for o.dry_run_world_size (default 8). Returns the exit code.
int run_dry_run(const Options& o);

}  // namespace ferry::bench
