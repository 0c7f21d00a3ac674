// One rank of a ferry-moe-layer run: rendezvous, TP all-reduce, the layer's handles, verification
// against the dense reference, timed schedules, and the table (and JSON) on rank 0.
#pragma once
#include "bench/moe_layer/options.h"

namespace ferry::moe {

// Returns this rank's exit code: 0, 1 (a failure or a verification mismatch, named on stderr), or
// 2 (options that do not fit the world size).
int run_rank(const Options& options, const char* launcher_label);

}  // namespace ferry::moe
