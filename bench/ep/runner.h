// One rank of a ferry-bench run: rendezvous, create the all-to-all, verify, time, gather to rank 0
// and report there.
#pragma once
#include "bench/ep/options.h"
#include "tools/common/launch.h"

namespace ferry::bench {

// Returns this rank's exit code: 0, 1 (verification or run failure; the message names the rank),
// or 2 (options that do not fit the world size). `nodes`: this rank's emulated node (--local-nodes),
// for the report.
int run_rank(const Options& options, const char* launcher_label, const tools::NodeEmulation& nodes);

}  // namespace ferry::bench
