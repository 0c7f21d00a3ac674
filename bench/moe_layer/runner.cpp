#include "bench/moe_layer/runner.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bench/moe_layer/layer.h"
#include "bench/moe_layer/measure.h"
#include "bench/moe_layer/memory.h"
#include "bench/moe_layer/reference.h"
#include "bench/moe_layer/tp_all_reduce.h"
#include "bench/moe_layer/verify.h"
#include "csrc/nccl/cores.h"
#include "csrc/plan.h"
#include "tools/common/bootstrap.h"
#include "tools/common/env.h"
#include "tools/common/launch.h"
#include "tools/common/report.h"
#include "transfer_engine/error.h"
#include "transfer_engine/topology.h"

#if defined(FERRY_HAVE_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace ferry::moe {

namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

struct ScheduleResult {
  ScheduleKind kind;
  Schedule schedule;
  ScheduleTiming timing;
  double gemm_flops = 0;  // this rank's, last step
};

json percentiles_json(const tools::Percentiles& p) {
  return {{"count", p.count}, {"min", p.min}, {"mean", p.mean}, {"p50", p.p50}, {"p90", p.p90}, {"p99", p.p99}, {"max", p.max}};
}

std::string dtype_text(ferry_dtype_t t) { return t == FERRY_F32 ? "f32" : "bf16"; }

// Where each library's threads may run, and whether they collide.
struct CoreReport {
  bool applied = false;  // --split-cores
  nccl::CoreSplit split;  // rank 0's
  std::vector<nccl::RankCores> ranks;
  std::vector<std::string> collisions;
  std::string other;  // "NCCL" or "the GEMM"
  int local_ranks = 1;  // ranks on rank 0's host
  int cpus = 1;         // CPUs rank 0 may use
};

void print_cores(const CoreReport& c) {
  const nccl::RankCores& r0 = c.ranks.front();
  std::printf("cores: %s; rank 0: Ferry's threads on %s, %s's on %s", c.applied ? "--split-cores" : "not split (no --split-cores)",
              nccl::cpu_text(r0.ferry).c_str(), c.other.c_str(), nccl::cpu_text(r0.other).c_str());
  if (c.applied && !c.split.note.empty()) std::printf(" (%s)", c.split.note.c_str());
  std::printf("\n");
  if (c.collisions.empty()) {
    std::printf("cores: no rank's Ferry threads may run where %s's of a rank of its node may\n", c.other.c_str());
    return;
  }
  std::printf("cores: %zu collision(s) of Ferry's threads with %s's, e.g. %s\n", c.collisions.size(), c.other.c_str(),
              c.collisions.front().c_str());
}

void print_table(const Options& o, const LayerShape& s, const std::vector<ScheduleResult>& results,
                 const std::vector<ferry_buffer_sizes_t>& sizes, const std::string& provider, const std::string& gemm,
                 const std::string& all_reduce, double all_reduce_us, const CoreReport& cores, const std::string& verify) {
  std::printf("ferry-moe-layer: %d ranks (TP %d, %d groups), %s backend, provider %s\n", s.world_size, s.tp_size,
              s.num_groups(), o.backend == FERRY_DEVICE_CUDA ? "cuda" : "host", provider.c_str());
  std::printf("layer: %d tokens per group and step, hidden %d, intermediate %d, %d experts (%d per rank), top-%d, "
              "SwiGLU experts, bf16 dispatch, %s combine\n",
              s.tokens, s.hidden, s.intermediate, s.num_experts, s.experts_per_rank(), s.top_k, dtype_text(s.out_dtype).c_str());
  std::printf("grouped GEMM: %s; TP all-reduce: %s, p50 %.1f us (before the layer, not in the step)\n", gemm.c_str(),
              all_reduce.c_str(), all_reduce_us);
  for (size_t b = 0; b < sizes.size(); ++b) {
    std::printf("all-to-all handle %zu: %s registered (%d rows per expert)%s\n", b,
                tools::format_bytes(double(sizes[b].total_registered_bytes)).c_str(), sizes[b].max_rows_per_expert,
                b == 1 ? ": the second micro-batch's buffers, what two batches in flight cost" : "");
  }
  print_cores(cores);
  std::printf("\n");
  tools::Table t;
  t.add_column("schedule", tools::Table::Align::left);
  t.add_column("ops", tools::Table::Align::left);
  t.add_column("transfer us");
  t.add_column("GEMM us");
  t.add_column("step us");
  t.add_column("step p90 us");
  t.add_column("hidden");
  t.add_column("GEMM GFLOP/s");
  for (const ScheduleResult& r : results) {
    const double gflops = r.timing.gemm_us.p50 > 0 ? r.gemm_flops / (r.timing.gemm_us.p50 * 1e3) : 0;
    t.add_row({schedule_name(r.kind), describe(r.schedule), tools::format("%.1f", r.timing.transfer_us.p50),
               tools::format("%.1f", r.timing.gemm_us.p50), tools::format("%.1f", r.timing.step_us.p50),
               tools::format("%.1f", r.timing.step_us.p90), tools::format("%.2f", r.timing.hidden_fraction),
               tools::format("%.2f", gflops)});
  }
  t.print(stdout);
  std::printf("p50 over %d iterations of the slowest rank's time; hidden = 1 - (step - GEMM) / transfer\n", o.iters);
  if (cores.local_ranks > cores.cpus)
    std::printf("note: %d ranks share %d CPUs here: the GEMM-alone run has every rank computing at once, while in a "
                "step the ranks partly take turns, which biases every hidden fraction up (the plain schedule, which "
                "hides nothing, is the control)\n",
                cores.local_ranks, cores.cpus);
  if (!verify.empty()) std::printf("%s\n", verify.c_str());
}

// The split of this rank's cores; the pool is its GPU's socket (hwloc) within the CPUs it may use,
// or those CPUs when hwloc knows no GPU here.
nccl::CoreSplit plan_split(te::Bootstrap& boot, const std::string& gpu_bus_id, int ferry_cores, int timeout_ms) {
  const std::vector<int> allowed = nccl::allowed_cpus();
  std::vector<int> pool = allowed;
  if (!gpu_bus_id.empty()) {
    try {
      const te::Topology topo = te::Topology::discover();
      pool = nccl::core_pool(topo, topo.find_gpu(gpu_bus_id), "", allowed);
    } catch (const Error&) {
      // No topology: the allowed CPUs.
    }
  }
  return nccl::plan_core_split(boot, tools::node_label(), pool, ferry_cores, timeout_ms);
}

}  // namespace

int run_rank(const Options& o, const char* launcher_label) {
  const tools::RankEnv env = tools::discover_rank_env();
  auto boot = tools::make_bootstrap(env, o.timeout_ms);
  const int rank = boot->rank(), world = boot->world_size();
  const LayerShape s = shape_of(o, world);
  if (const std::string msg = check_shape(s); !msg.empty()) {
    if (rank == 0) std::fprintf(stderr, "ferry-moe-layer: error: %s (world size %d)\n", msg.c_str(), world);
    return 2;
  }
  tools::CBootstrap cboot(*boot);
  const bool device = o.backend == FERRY_DEVICE_CUDA;
  const int cpus_here = int(nccl::allowed_cpus().size());  // before --split-cores narrows this thread
  LayerOptions lo;
  lo.shape = s;
  lo.rank = rank;
  lo.device = o.backend;
  lo.provider = o.provider;
  lo.nets_per_rank = o.nets_per_rank;
  lo.timeout_ms = o.timeout_ms;
  lo.micro_batches =
      std::any_of(o.schedules.begin(), o.schedules.end(), [](ScheduleKind k) { return k == ScheduleKind::tbo; }) ? 2 : 1;
  lo.gemm_threads = o.gemm_threads > 0 ? o.gemm_threads : default_gemm_threads(boot->local_size());
  std::string gpu_bus_id;
#if defined(FERRY_HAVE_CUDA)
  if (device) {
    int gpus = 0;
    if (cudaGetDeviceCount(&gpus) != cudaSuccess || gpus == 0)
      raise(Status::unsupported, "--backend cuda: no CUDA GPU on this host (cudaGetDeviceCount found none)");
    lo.cuda_device = (env.local_rank >= 0 ? env.local_rank : rank) % gpus;
    if (cudaSetDevice(lo.cuda_device) != cudaSuccess) raise(Status::internal, "cudaSetDevice failed");
    char bus[32] = {};
    if (cudaDeviceGetPCIBusId(bus, sizeof bus, lo.cuda_device) == cudaSuccess) gpu_bus_id = bus;
  }
#endif
  // This rank's share of its GPU's socket, split between Ferry's threads (a worker per handle, and a
  // proxy per handle on CUDA) and NCCL's (on the host backend: the GEMM's).
  const nccl::CoreSplit split = plan_split(*boot, gpu_bus_id, lo.micro_batches * (device ? 2 : 1), o.timeout_ms);
  if (o.split_cores) {
    lo.ferry_cpus = split.ferry;
    if (!device) lo.gemm_cpus = split.nccl;
  }

  // Attention-TP all-reduce of this member's partial: the layer's input.
  std::vector<uint16_t> x = attention_partial(s, s.group_of(rank), s.member_of(rank));
  MoeLayer layer(lo, cboot.get());
  std::unique_ptr<TpAllReduce> all_reduce;
  Memory x_dev(x.size() * sizeof(uint16_t), device);
  std::vector<int> other_cpus;  // where NCCL's threads (host: the GEMM's) may run
  std::optional<nccl::ScopedAffinity> on_gemm_cores;
  if (device) {
    const auto before = nccl::process_threads();
    all_reduce = make_nccl_all_reduce(cboot.get(), s.tp_size, lo.cuda_device, layer.stream(), o.timeout_ms,
                                      o.split_cores ? split.nccl : std::vector<int>{});
    other_cpus = nccl::cpus_of(nccl::new_threads(before, nccl::process_threads()));
  } else {
    all_reduce = make_bootstrap_all_reduce(cboot.get(), s.tp_size, o.timeout_ms);
    // The calling thread runs GEMM tiles (and packs and unpacks): with the split, on the GEMM's side.
    if (o.split_cores) on_gemm_cores.emplace(split.nccl);
    other_cpus = nccl::thread_cpus();
    const auto pool = nccl::cpus_of(layer.gemm_threads());
    other_cpus.insert(other_cpus.end(), pool.begin(), pool.end());
  }
  nccl::RankCores cores;
  cores.rank = rank;
  cores.node = tools::node_label();
  cores.ferry = nccl::cpus_of(layer.ferry_threads());
  cores.other = other_cpus;
  const std::vector<nccl::RankCores> rank_cores = nccl::gather_rank_cores(*boot, cores, o.timeout_ms);
  const std::vector<std::string> collisions = nccl::core_collisions(rank_cores, device ? "NCCL" : "the GEMM");
  std::vector<double> all_reduce_us;
  const std::vector<uint16_t> partial = x;
  for (int i = 0; i < std::max(1, o.iters / 4); ++i) {
    x_dev.upload(partial.data(), x_dev.bytes());
    boot->barrier(o.timeout_ms);
    const auto t0 = Clock::now();
    all_reduce->all_reduce_bf16(x_dev.get(), x.size());
    all_reduce_us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  x_dev.download(x.data(), x_dev.bytes());
  layer.set_tokens(x.data());

  // ---- verification: every token of every schedule against the dense reference ------------------
  std::string failure;
  if (o.verify) {
    const ReferenceOutput want = reference_layer(s, s.group_of(rank));
    if (want.x != x) failure += "rank " + std::to_string(rank) + ": the TP all-reduce's hidden states differ from the sum of the partials\n";
    for (ScheduleKind kind : o.schedules) {
      boot->barrier(o.timeout_ms);
      failure += verify_schedule(layer, s, want, rank, kind);
    }
  }
  const auto failures = tools::allgather_strings(*boot, failure, o.timeout_ms);
  std::string verify_text;
  std::vector<int> failed_ranks;
  for (int r = 0; r < world; ++r)
    if (!failures[size_t(r)].empty()) failed_ranks.push_back(r);
  if (o.verify) {
    if (failed_ranks.empty()) {
      verify_text = "verify: PASS: every token of every rank within the dtype-derived tolerance of the dense reference, "
                    "expert rows and the TP all-reduce exact";
    } else {
      verify_text = "verify: FAIL on " + std::to_string(failed_ranks.size()) + " rank(s)";
    }
  }
  if (!failure.empty()) std::fprintf(stderr, "ferry-moe-layer: verify failed:\n%s", failure.c_str());

  // ---- timed schedules ----------------------------------------------------------------------------
  std::vector<ScheduleResult> results;
  for (ScheduleKind kind : o.schedules) {
    ScheduleResult r;
    r.kind = kind;
    r.schedule = make_schedule(kind);
    const ScheduleSamples samples = time_schedule(layer, *boot, r.schedule, o.warmup, o.iters, o.timeout_ms);
    layer.run(gemms_of(r.schedule));
    r.gemm_flops = layer.last_gemm_flops();
    r.timing = summarize_schedule(*boot, samples, o.timeout_ms);
    // The slowest rank's GEMM time is the job's; its work is the largest.
    const auto flops = tools::allgather_values(*boot, std::vector<double>{r.gemm_flops}, o.timeout_ms);
    r.gemm_flops = *std::max_element(flops.begin(), flops.end());
    results.push_back(r);
  }
  const double all_reduce_p50 = [&] {
    const auto all = tools::allgather_values(*boot, all_reduce_us, o.timeout_ms);
    return tools::percentiles(all).p50;
  }();
  std::vector<ferry_buffer_sizes_t> sizes;
  for (int b = 0; b < layer.num_handles(); ++b) sizes.push_back(layer.buffer_sizes(b));
  boot->barrier(o.timeout_ms);

  if (rank == 0) {
    const char* env_provider = std::getenv("FERRY_PROVIDER");
    const std::string provider = !o.provider.empty() ? o.provider : env_provider ? env_provider : "tcp";
    CoreReport core_report{o.split_cores, split, rank_cores, collisions, device ? "NCCL" : "the GEMM",
                           boot->local_size(), cpus_here};
    print_table(o, s, results, sizes, provider, layer.gemm_description(), all_reduce->describe(), all_reduce_p50,
                core_report, verify_text);
    if (!o.json_path.empty()) {
      json j;
      j["config"] = {{"world_size", world}, {"tp", s.tp_size}, {"tokens", s.tokens}, {"hidden", s.hidden},
                     {"intermediate", s.intermediate}, {"experts", s.num_experts}, {"topk", s.top_k},
                     {"out_dtype", dtype_text(s.out_dtype)}, {"backend", device ? "cuda" : "host"},
                     {"provider", provider}, {"warmup", o.warmup}, {"iters", o.iters}, {"seed", o.seed},
                     {"launcher", launcher_label}};
      j["grouped_gemm"] = layer.gemm_description();
      j["tp_all_reduce"] = {{"how", all_reduce->describe()}, {"p50_us", all_reduce_p50}};
      for (const auto& b : sizes)
        j["handles"].push_back({{"registered_bytes", b.total_registered_bytes}, {"max_rows_per_expert", b.max_rows_per_expert}});
      for (const ScheduleResult& r : results) {
        j["schedules"].push_back({{"name", schedule_name(r.kind)}, {"ops", describe(r.schedule)},
                                  {"step_us", percentiles_json(r.timing.step_us)},
                                  {"transfer_us", percentiles_json(r.timing.transfer_us)},
                                  {"gemm_us", percentiles_json(r.timing.gemm_us)},
                                  {"hidden_fraction", r.timing.hidden_fraction}, {"gemm_flops", r.gemm_flops}});
      }
      for (const auto& rc : rank_cores)
        j["cores"]["ranks"].push_back({{"rank", rc.rank}, {"node", rc.node}, {"ferry", nccl::cpu_text(rc.ferry)},
                                       {device ? "nccl" : "gemm", nccl::cpu_text(rc.other)}});
      j["cores"]["split_applied"] = o.split_cores;
      j["cores"]["collisions"] = collisions;
      j["verify"] = {{"requested", o.verify}, {"passed", o.verify && failed_ranks.empty()}, {"failed_ranks", failed_ranks}};
      std::ofstream f(o.json_path);
      f << j.dump(2) << "\n";
      if (!f) raise(Status::invalid_argument, "--json " + o.json_path + ": cannot write the file");
    }
  }
  return failed_ranks.empty() ? 0 : 1;
}

}  // namespace ferry::moe
