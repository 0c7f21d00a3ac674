#include "bench/moe_layer/options.h"

#include <CLI/CLI.hpp>

#include <cstdio>
#include <map>

#include "tools/common/cli_checks.h"

namespace ferry::moe {

namespace {

struct Preset {
  int tokens, hidden, intermediate, experts, topk;
};

// cpu: sized so that on a few shared cores the experts' GEMM and the transfers take comparable time
// (a narrow expert FFN; the overlap is what is measured). qwen3-30b-a3b and
// deepseek-v3: the MoE layers of those models (hidden, per-expert FFN width, experts, top-k) at
// decode's 128 tokens per group.
const std::map<std::string, Preset>& presets() {
  static const std::map<std::string, Preset> p = {
      {"cpu", {64, 1024, 32, 32, 4}},
      {"qwen3-30b-a3b", {128, 2048, 768, 128, 8}},
      {"deepseek-v3", {128, 7168, 2048, 256, 8}},
  };
  return p;
}

}  // namespace

ParseResult parse_options(int argc, const char* const* argv) {
  Options o;
  CLI::App app{
      "ferry-moe-layer: one MoE layer forward (router, Ferry dispatch, grouped expert GEMM, combine) "
      "in the plain and the two-micro-batch (tbo) schedule; reports transfer, GEMM and step time and "
      "the hidden fraction 1 - (step - GEMM) / transfer.\n"
      "Launch under mpirun/srun, torchrun-style variables, or --local-ranks N.",
      "ferry-moe-layer"};
  app.get_formatter()->column_width(34);
  const std::map<std::string, ferry_dtype_t> dtypes{{"bf16", FERRY_BF16}, {"f32", FERRY_F32}};
  const std::map<std::string, ferry_device_t> backends{{"host", FERRY_DEVICE_HOST}, {"cuda", FERRY_DEVICE_CUDA}};
  std::string preset = "cpu", schedule = "both";
  app.add_option("--preset", preset,
                 "shape: cpu (64 tokens, hidden 1024, intermediate 32, 32 experts, top-4), qwen3-30b-a3b "
                 "(128, 2048, 768, 128, top-8), deepseek-v3 (128, 7168, 2048, 256, top-8); options below "
                 "override it")
      ->check(CLI::IsMember({"cpu", "qwen3-30b-a3b", "deepseek-v3"}));
  auto* tokens = app.add_option("--tokens", o.tokens, "tokens per attention-TP group and step")->check(CLI::Range(1, 1 << 16));
  auto* hidden = app.add_option("--hidden", o.hidden, "hidden dimension")->check(CLI::Range(1, 1 << 16));
  auto* inter = app.add_option("--intermediate", o.intermediate, "FFN width of one expert")->check(CLI::Range(1, 1 << 16));
  auto* experts = app.add_option("--experts", o.experts, "experts in total")->check(CLI::Range(1, 1 << 16));
  auto* topk = app.add_option("--topk", o.topk, "experts per token (1..8)")->check(CLI::Range(1, 8));
  app.add_option("--tp", o.tp, "attention-TP group size (all-reduce before the layer; Ferry's dp_size)")
      ->check(CLI::Range(1, kMaxTpSize));
  app.add_option("--out-dtype", o.out_dtype, "expert output and combine type: bf16 or f32")
      ->transform(CLI::CheckedTransformer(dtypes));
  app.add_option("--seed", o.seed, "seed of weights and tokens");
  app.add_option("--backend", o.backend, "host (threaded CPU GEMM) or cuda (cuBLAS grouped GEMM)")
      ->transform(CLI::CheckedTransformer(backends));
  app.add_option("--provider", o.provider, "libfabric provider (tcp, shm, efa, ...; default: FERRY_PROVIDER or tcp)");
  app.add_option("--nets-per-rank", o.nets_per_rank, "NICs per rank")->check(CLI::Range(1, 8));
  app.add_option("--timeout-ms", o.timeout_ms, "deadline of every wait")->check(CLI::Range(1, 3600000));
  app.add_option("--gemm-threads", o.gemm_threads,
                 "host GEMM threads per rank (0: the CPUs this process may use / ranks on this host - 1, at least 1)")
      ->check(CLI::Range(0, 1024));
  app.add_flag("--split-cores", o.split_cores,
               "start Ferry's threads (engine workers, CUDA proxies) and NCCL's (host: the GEMM's) on separate "
               "cores of this rank's share of its GPU's socket (csrc/nccl/cores.h); without it they run "
               "anywhere. Either way the report says where each library's threads may run and whether they collide");
  app.add_option("--schedule", schedule, "plain, tbo, or both")->check(CLI::IsMember({"plain", "tbo", "both"}));
  app.add_option("--warmup", o.warmup, "untimed iterations per schedule")->check(CLI::Range(0, 100000));
  app.add_option("--iters", o.iters, "timed iterations per schedule")->check(CLI::Range(1, 100000));
  app.add_flag("--verify", o.verify, "check every token's output of each schedule against the dense reference layer");
  app.add_option("--json", o.json_path, "write config and statistics as JSON");
  app.add_option("--local-ranks", o.local_ranks, "start this many ranks on this machine")->check(CLI::Range(1, 4096));
  app.add_option("--launcher", o.launcher, "for --local-ranks: fork (default) or mpi")->check(CLI::IsMember({"mpi", "fork"}));
  app.add_option("--launch-timeout-ms", o.launch_timeout_ms, "for --local-ranks: deadline of the whole job")
      ->check(CLI::Range(1, 86400000));
  if (auto code = tools::parse_command_line(app, argc, argv, "ferry-moe-layer:")) return {std::nullopt, *code};
  const Preset& p = presets().at(preset);
  o.preset = preset;
  if (!tokens->count()) o.tokens = p.tokens;
  if (!hidden->count()) o.hidden = p.hidden;
  if (!inter->count()) o.intermediate = p.intermediate;
  if (!experts->count()) o.experts = p.experts;
  if (!topk->count()) o.topk = p.topk;
  if (schedule == "plain") o.schedules = {ScheduleKind::plain};
  if (schedule == "tbo") o.schedules = {ScheduleKind::tbo};

  auto bad = [](const std::string& msg) {
    std::fprintf(stderr, "ferry-moe-layer: error: %s\nRun with --help for the options.\n", msg.c_str());
    return ParseResult{std::nullopt, 2};
  };
  if (o.topk > o.experts) return bad("--topk " + std::to_string(o.topk) + " is larger than --experts " + std::to_string(o.experts));
  if (!o.launcher.empty() && o.local_ranks == 0) return bad("--launcher is only used with --local-ranks");
  if (o.backend == FERRY_DEVICE_CUDA && o.out_dtype != FERRY_BF16)
    return bad("--backend cuda runs the grouped GEMM with bf16 output only (--out-dtype bf16)");
  if (o.local_ranks > 0) {
    if (const std::string msg = check_shape(shape_of(o, o.local_ranks)); !msg.empty()) return bad(msg + " (--local-ranks)");
  }
  return {o, 0};
}

LayerShape shape_of(const Options& o, int world_size) {
  LayerShape s;
  s.world_size = world_size;
  s.tp_size = o.tp;
  s.num_experts = o.experts;
  s.top_k = o.topk;
  s.hidden = o.hidden;
  s.intermediate = o.intermediate;
  s.tokens = o.tokens;
  s.out_dtype = o.out_dtype;
  s.seed = o.seed;
  return s;
}

}  // namespace ferry::moe
