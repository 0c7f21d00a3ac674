// ferry-bench's command line: presets, every shape and protocol parameter, routing, timing and
// output options. Parsing is separate from running so tests and --dry-run use it alone.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "ferry/ferry.h"

namespace ferry::bench {

enum class RoutingMode { uniform, zipf, file };

// The steepest zipf law --zipf-s accepts: at 10 the top expert already takes 99.9% of draws.
constexpr double kMaxZipfS = 10.0;

struct Options {
  std::string preset = "decode";
  int tokens = 128;              // tokens per rank (max_tokens_per_rank)
  int hidden = 7168;
  int topk = 8;
  int experts = 256;
  ferry_dtype_t in_dtype = FERRY_FP8_E4M3;
  ferry_dtype_t out_dtype = FERRY_BF16;
  int scale_block = 128;         // 0: no scales
  int dp_size = 1;
  int nets_per_rank = 1;
  std::string provider;          // empty: FERRY_PROVIDER or tcp
  ferry_device_t backend = FERRY_DEVICE_HOST;
  int private_tokens = -1;
  int expert_alignment = 1;
  int warmup = 5;
  int iters = 50;
  int timeout_ms = 30000;
  uint64_t seed = 1;

  RoutingMode routing = RoutingMode::uniform;
  double zipf_s = 1.2;                // finite, in [0, kMaxZipfS]
  std::string routing_file;

  bool overlap = false;          // --overlap / --overlap gemm: one dense GEMM between SEND and RECV
  int gemm_m = 256, gemm_n = 256, gemm_k = 256;
  // --overlap tbo: the MoE layer (bench/moe_layer) in the plain and the two-micro-batch schedule,
  // its grouped expert GEMM `expert_intermediate` wide.
  bool overlap_tbo = false;
  int expert_intermediate = 256;

  bool verify = false;
  std::string json_path;
  std::string csv_path;
  bool compare = false;
  bool progress = true;

  bool dry_run = false;
  int dry_run_world_size = 0;    // --world-size for --dry-run; 0: 8

  int local_ranks = 0;           // >0: launch this many ranks here
  int local_nodes = 0;           // >0 (with local_ranks): the ranks play this many nodes (FERRY_NODE_ID)
  std::string launcher;          // "mpi" | "fork"; empty: mpi when mpirun exists
  int launch_timeout_ms = 0;     // 0: derived from iterations and timeout_ms

  // Self-test of --verify: this rank flips one received byte before checking, so the check must
  // fail naming it. Hidden from --help.
  int inject_verify_fault_rank = -1;
};

const char* dtype_name(ferry_dtype_t t);
const char* routing_name(RoutingMode r);
const char* backend_name(ferry_device_t d);

// Outcome of parsing: either options to run with, or an exit code (0 after --help, 2 on a bad
// argument, with the message already printed to stderr naming the argument).
struct ParseResult {
  std::optional<Options> options;
  int exit_code = 0;
};
ParseResult parse_options(int argc, const char* const* argv);

// The provider the ranks run: --provider, else FERRY_PROVIDER, else tcp (what the engine picks).
std::string resolved_provider(const Options& o);

// The a2a config a rank runs with.
ferry_a2a_config_t make_a2a_config(const Options& o, int rank, int world_size);

// Checks the options that depend on the world size (experts divisible, dp_size divides it, ...).
// Returns an empty string when fine, else a message naming the option.
std::string check_world_size(const Options& o, int world_size);

}  // namespace ferry::bench
