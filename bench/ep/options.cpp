#include "bench/ep/options.h"

#include <CLI/CLI.hpp>

#include <cstdio>
#include <cstdlib>
#include <map>

#include "bench/moe_layer/model.h"
#include "tools/common/cli_checks.h"
#include "tools/common/launch.h"

namespace ferry::bench {

const char* dtype_name(ferry_dtype_t t) {
  switch (t) {
    case FERRY_BF16: return "bf16";
    case FERRY_F16: return "f16";
    case FERRY_F32: return "f32";
    case FERRY_FP8_E4M3: return "fp8_e4m3";
  }
  return "?";
}

const char* routing_name(RoutingMode r) {
  switch (r) {
    case RoutingMode::uniform: return "uniform";
    case RoutingMode::zipf: return "zipf";
    case RoutingMode::file: return "file";
  }
  return "?";
}

const char* backend_name(ferry_device_t d) { return d == FERRY_DEVICE_CUDA ? "cuda" : "host"; }

namespace {

const char* kRoutingFileHelp =
    "Routing file format: plain text, one token per line: `RANK E0 E1 ... E(k-1)` (whitespace "
    "separated; expert ids in [0, experts), -1 for no route). A rank's tokens are its lines, in "
    "order (at most --tokens of them). Blank lines and lines starting with '#' are ignored. Every "
    "iteration uses the same routing; weights are drawn by the seeded generator.";

}  // namespace

ParseResult parse_options(int argc, const char* const* argv) {
  Options o;
  CLI::App app{
      "ferry-bench: expert-parallel dispatch/combine latency (p50/p90/p99/max over all ranks), "
      "with an MPI all-to-all of the same records as baseline.\n"
      "Launch under mpirun/srun, torchrun-style variables, or --local-ranks N.",
      "ferry-bench"};
  app.footer(kRoutingFileHelp);
  app.get_formatter()->column_width(34);

  const std::map<std::string, ferry_dtype_t> dtypes{
      {"bf16", FERRY_BF16}, {"f16", FERRY_F16}, {"f32", FERRY_F32}, {"fp8_e4m3", FERRY_FP8_E4M3},
      {"fp8", FERRY_FP8_E4M3}};
  const std::map<std::string, ferry_device_t> backends{{"host", FERRY_DEVICE_HOST},
                                                       {"cuda", FERRY_DEVICE_CUDA}};
  const std::map<std::string, RoutingMode> routings{
      {"uniform", RoutingMode::uniform}, {"zipf", RoutingMode::zipf}, {"file", RoutingMode::file}};

  std::string preset = "decode";
  app.add_option("--preset", preset,
                 "decode: 128 tokens/rank, hidden 7168, top-8, 256 experts, fp8 e4m3 + 128-block "
                 "scales in, bf16 out; prefill: the same with 4096 tokens/rank")
      ->check(CLI::IsMember({"decode", "prefill"}));
  auto* tokens = app.add_option("--tokens", o.tokens, "tokens per rank")->check(CLI::Range(1, 1 << 20));
  app.add_option("--hidden", o.hidden, "hidden dimension")->check(CLI::Range(1, 1 << 20));
  app.add_option("--topk", o.topk, "experts per token (1..8)")->check(CLI::Range(1, 8));
  app.add_option("--experts", o.experts, "experts in total")->check(CLI::Range(1, 1 << 20));
  app.add_option("--in-dtype", o.in_dtype, "dispatch payload: fp8_e4m3, bf16, f16, f32")
      ->transform(CLI::CheckedTransformer(dtypes));
  app.add_option("--out-dtype", o.out_dtype, "combine output: bf16, f16, f32")
      ->transform(CLI::CheckedTransformer(dtypes));
  app.add_option("--scale-block", o.scale_block, "elements per fp32 scale (0: no scales)")
      ->check(CLI::Range(0, 1 << 20));
  app.add_option("--dp-size", o.dp_size, "ranks of one attention-TP group sharing tokens")
      ->check(CLI::Range(1, 4096));
  app.add_option("--nets-per-rank", o.nets_per_rank, "NICs per rank")->check(CLI::Range(1, 8));
  app.add_option("--provider", o.provider, "libfabric provider (tcp, shm, efa, ...; default: "
                                           "FERRY_PROVIDER or tcp)");
  app.add_option("--backend", o.backend, "host or cuda")->transform(CLI::CheckedTransformer(backends));
  app.add_option("--private-tokens", o.private_tokens,
                 "records per sender written speculatively (-1: automatic)")
      ->check(CLI::Range(-1, 1 << 20));
  app.add_option("--expert-alignment", o.expert_alignment, "rows per expert padded to a multiple")
      ->check(CLI::Range(1, 4096));
  app.add_option("--warmup", o.warmup, "untimed iterations")->check(CLI::Range(0, 1000000));
  app.add_option("--iters", o.iters, "timed iterations")->check(CLI::Range(1, 1000000));
  app.add_option("--timeout-ms", o.timeout_ms, "deadline of every wait")->check(CLI::Range(1, 3600000));
  app.add_option("--seed", o.seed, "seed of the input generator");
  app.add_option("--routing", o.routing, "uniform (fresh each iteration), zipf, file")
      ->transform(CLI::CheckedTransformer(routings));
  app.add_option("--zipf-s", o.zipf_s, "zipf exponent for --routing zipf (0: uniform; 10: nearly "
                                       "every token picks the same experts)")
      ->check(tools::finite_in(0.0, kMaxZipfS));
  app.add_option("--routing-file", o.routing_file, "routing for --routing file (format below)");
  std::string overlap;
  auto* overlap_opt =
      app.add_option("--overlap", overlap,
                     "gemm (also bare --overlap): run a GEMM between SEND and RECV and report how much of the "
                     "transfer it hid; tbo: run the MoE layer (router, dispatch, grouped expert GEMM, combine) "
                     "in the plain and the two-micro-batch schedule and report per step transfer, GEMM and "
                     "step time and the hidden fraction 1 - (step - GEMM) / transfer")
          ->expected(0, 1)
          ->check(CLI::IsMember({"gemm", "tbo"}));
  app.add_option("--expert-intermediate", o.expert_intermediate,
                 "--overlap tbo: FFN width of one expert (gate, up and down are hidden x this)")
      ->check(CLI::Range(1, 65536));
  app.add_option("--gemm-m", o.gemm_m, "overlap GEMM rows")->check(CLI::Range(1, 65536));
  app.add_option("--gemm-n", o.gemm_n, "overlap GEMM columns")->check(CLI::Range(1, 65536));
  app.add_option("--gemm-k", o.gemm_k, "overlap GEMM depth")->check(CLI::Range(1, 65536));
  app.add_flag("--verify", o.verify, "check the first iteration against the brute-force reference");
  app.add_option("--json", o.json_path, "write config, environment and statistics as JSON");
  app.add_option("--csv", o.csv_path, "write statistics as CSV (one row per operation)");
  app.add_flag("--compare", o.compare, "add published figures (other hardware) for this EP size and shape");
  bool no_progress = false;
  app.add_flag("--no-progress", no_progress, "no progress line on stderr");
  app.add_flag("--dry-run", o.dry_run, "print buffer memory and bytes per step for --world-size; "
                                       "launch nothing");
  app.add_option("--world-size", o.dry_run_world_size, "EP size for --dry-run")->check(CLI::Range(1, 4096));
  app.add_option("--local-ranks", o.local_ranks, "start this many ranks on this machine")
      ->check(CLI::Range(1, 4096));
  app.add_option("--local-nodes", o.local_nodes,
                 "for --local-ranks R: the ranks play N nodes, R/N contiguous ranks each (rank r gets "
                 "FERRY_NODE_ID=local-node-<r*N/R> unless FERRY_NODE_ID is set), so --backend cuda uses "
                 "CUDA IPC within a node and the transfer engine between nodes")
      ->check(CLI::Range(1, 4096));
  app.add_option("--launcher", o.launcher,
                 "for --local-ranks: mpi (mpirun -np N; gives the MPI baseline; default when mpirun "
                 "exists) or fork")
      ->check(CLI::IsMember({"mpi", "fork"}));
  app.add_option("--launch-timeout-ms", o.launch_timeout_ms,
                 "for --local-ranks: deadline of the whole job (default: from iterations and "
                 "--timeout-ms)")
      ->check(CLI::Range(1, 86400000));

  app.add_option("--inject-verify-fault", o.inject_verify_fault_rank,
                 "self-test: this rank corrupts one received byte before --verify checks it")
      ->group("");

  // The defaults are the decode preset; prefill differs only in tokens, so it applies after parsing
  // unless --tokens was given (explicit options always win over the preset).
  if (auto code = tools::parse_command_line(app, argc, argv, "ferry-bench:")) return {std::nullopt, *code};
  o.preset = preset;
  o.progress = !no_progress;
  o.overlap_tbo = overlap == "tbo";
  o.overlap = overlap_opt->count() > 0 && !o.overlap_tbo;
  if (preset == "prefill" && tokens->count() == 0) o.tokens = 4096;

  auto bad = [](const std::string& msg) {
    std::fprintf(stderr, "ferry-bench: error: %s\nRun with --help for the options.\n", msg.c_str());
    return ParseResult{std::nullopt, 2};
  };
  if (o.routing == RoutingMode::file && o.routing_file.empty()) {
    return bad("--routing file needs --routing-file PATH");
  }
  if (!o.routing_file.empty() && o.routing != RoutingMode::file) {
    return bad("--routing-file is only used with --routing file");
  }
  if (o.out_dtype == FERRY_FP8_E4M3) return bad("--out-dtype must be bf16, f16 or f32 (got fp8_e4m3)");
  if (o.topk > o.experts) {
    return bad("--topk " + std::to_string(o.topk) + " is larger than --experts " + std::to_string(o.experts));
  }
  if (o.scale_block > 0 && o.hidden % o.scale_block != 0) {
    return bad("--scale-block " + std::to_string(o.scale_block) + " does not divide --hidden " +
               std::to_string(o.hidden));
  }
  if (o.dry_run_world_size > 0 && !o.dry_run) return bad("--world-size is only used with --dry-run");
  if (!o.launcher.empty() && o.local_ranks == 0) return bad("--launcher is only used with --local-ranks");
  if (o.local_nodes > 0 && o.local_ranks == 0) {
    return bad("--local-nodes " + std::to_string(o.local_nodes) +
               " is only used with --local-ranks (it splits the ranks started here into nodes)");
  }
  if (o.local_nodes > 0) {
    if (auto msg = tools::check_local_nodes(o.local_nodes, o.local_ranks); !msg.empty()) return bad(msg);
  }
  if (o.local_ranks > 0 && !o.dry_run) {
    if (auto msg = check_world_size(o, o.local_ranks); !msg.empty()) return bad(msg + " (--local-ranks)");
  }
  if (o.inject_verify_fault_rank >= 0 && !o.verify) return bad("--inject-verify-fault needs --verify");
  if (o.overlap_tbo && o.out_dtype == FERRY_F16)
    return bad("--overlap tbo runs the MoE layer, whose expert outputs are bf16 or f32: --out-dtype bf16 or f32");
  if (o.overlap_tbo && o.backend == FERRY_DEVICE_CUDA && o.out_dtype != FERRY_BF16)
    return bad("--overlap tbo with --backend cuda: the grouped GEMM writes bf16 expert outputs (--out-dtype bf16)");
  if (o.overlap_tbo && o.dp_size > moe::kMaxTpSize)
    return bad("--overlap tbo: --dp-size is the layer's attention-TP size, at most " + std::to_string(moe::kMaxTpSize) +
               " (got " + std::to_string(o.dp_size) + ")");
  return {o, 0};
}

std::string check_world_size(const Options& o, int world_size) {
  const std::string w = std::to_string(world_size);
  if (o.experts % world_size != 0) {
    return "--experts " + std::to_string(o.experts) + " is not divisible by the world size " + w;
  }
  if (world_size % o.dp_size != 0) {
    return "--dp-size " + std::to_string(o.dp_size) + " does not divide the world size " + w;
  }
  return {};
}

std::string resolved_provider(const Options& o) {
  if (!o.provider.empty()) return o.provider;
  const char* env = std::getenv("FERRY_PROVIDER");
  return env && *env ? env : "tcp";
}

ferry_a2a_config_t make_a2a_config(const Options& o, int rank, int world_size) {
  ferry_a2a_config_t c;
  ferry_a2a_config_init(&c);
  c.rank = rank;
  c.world_size = world_size;
  c.num_experts = o.experts;
  c.experts_per_token = o.topk;
  c.max_tokens_per_rank = o.tokens;
  c.hidden_dim = o.hidden;
  c.in_dtype = o.in_dtype;
  c.scale_block = o.scale_block;
  c.out_dtype = o.out_dtype;
  c.expert_alignment = o.expert_alignment;
  c.device = o.backend;
  c.nets_per_rank = o.nets_per_rank;
  c.provider = o.provider.empty() ? nullptr : o.provider.c_str();
  c.timeout_ms = o.timeout_ms;
  c.dp_size = o.dp_size;
  c.private_tokens = o.private_tokens;
  return c;
}

}  // namespace ferry::bench
