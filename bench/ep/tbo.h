// --overlap tbo: the MoE layer of bench/moe_layer at ferry-bench's shape (tokens per rank, hidden,
// experts, top-k, dp_size as the attention-TP size, out dtype; bf16 dispatch), in the plain and the
// two-micro-batch schedule, timed as ferry-moe-layer times it (bench/moe_layer/measure.h).
#pragma once
#include <string>
#include <vector>

#include "bench/ep/options.h"
#include "ferry/ferry.h"
#include "tools/common/report.h"
#include "transfer_engine/bootstrap.h"

namespace ferry::bench {

struct TboSchedule {
  std::string name;  // "plain", "tbo"
  std::string ops;   // "DS0 DR0 DS1 G0 DR1 CS0 G1 CR0 CS1 CR1"
  tools::Percentiles transfer_us, gemm_us, step_us;  // per iteration the slowest rank's time
  double hidden_fraction = 0;                        // 1 - (step - GEMM) / transfer, from the p50s
};

struct TboResult {
  int intermediate = 0;
  std::string gemm;                        // how the grouped GEMM runs
  std::vector<uint64_t> handle_bytes;      // registered per all-to-all handle (one per micro-batch)
  std::vector<TboSchedule> schedules;      // plain, tbo
  bool verified = false;                   // --verify checked every token of both schedules
  std::vector<int> verify_failed_ranks;
};

// Collective over `boot` (which `cboot` borrows). cuda_device: this rank's GPU for --backend cuda.
TboResult run_tbo(const Options& o, te::Bootstrap& boot, ferry_bootstrap_t cboot, int cuda_device);

}  // namespace ferry::bench
