// ferry-moe-layer's command line. Parsing is separate from running so the tests use it alone.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "bench/moe_layer/model.h"
#include "bench/moe_layer/schedule.h"
#include "ferry/ferry.h"

namespace ferry::moe {

struct Options {
  std::string preset = "cpu";
  // Shape (world size comes from the launch).
  int tokens = 64;            // per attention-TP group and step
  int hidden = 1024;
  int intermediate = 32;
  int experts = 32;
  int topk = 4;
  int tp = 1;
  ferry_dtype_t out_dtype = FERRY_BF16;
  uint64_t seed = 1;
  // Where it runs.
  ferry_device_t backend = FERRY_DEVICE_HOST;
  std::string provider;       // empty: FERRY_PROVIDER or tcp
  int nets_per_rank = 1;
  int timeout_ms = 30000;
  int gemm_threads = 0;       // host: 0 = default_gemm_threads
  bool split_cores = false;   // Ferry's threads and NCCL's (host: the GEMM's) on their own cores
  // What it measures.
  std::vector<ScheduleKind> schedules = {ScheduleKind::plain, ScheduleKind::tbo};
  int warmup = 3;
  int iters = 20;
  bool verify = false;
  std::string json_path;
  // Launch.
  int local_ranks = 0;
  std::string launcher;       // "mpi" | "fork"; empty: fork
  int launch_timeout_ms = 0;  // 0: derived
};

struct ParseResult {
  std::optional<Options> options;
  int exit_code = 0;  // 0 after --help, 2 after a bad argument (message printed, naming it)
};
ParseResult parse_options(int argc, const char* const* argv);

// The layer's shape for a world size.
LayerShape shape_of(const Options& options, int world_size);

}  // namespace ferry::moe
